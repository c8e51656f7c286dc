"""Builds the native relay engine (rapproxy/dataplane/_native.c); metadata lives in setup.cfg.

A C extension needs a setup.py (or a build backend that compiles C); everything else about the
package stays declarative. The build must succeed: `proxy.relayEngine: native` refuses to start
without the extension rather than falling back silently, so a broken compiler shows up at
`make install`, not on a node.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rapproxy.dataplane._native",
            sources=["rapproxy/dataplane/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=False,
        )
    ]
)
