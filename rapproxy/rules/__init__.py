"""Interception: the iptables nat rules that steer Service traffic into rapproxy's sockets.

`render` builds `iptables-restore` text (pure), `backend` finds which iptables the host uses
(nft or legacy), `apply` runs the transactions, and `conntrack` forgets stale UDP flows whose
redirect target changed. See `render`'s docstring for the chain layout.
"""
