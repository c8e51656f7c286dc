"""Configuration: defaults, the three sources and their precedence, and every validation rule."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import yaml

from rapproxy.config import (
    API_VERSION,
    KIND,
    ConfigError,
    ProxySettings,
    RapproxyConfiguration,
    defaults_yaml,
    env_variable_names,
    from_mapping,
    from_yaml,
    handover_address,
    load,
    parse_duration,
    parse_host_port,
    parse_port_range,
    reference_rows,
    to_mapping,
    validate,
)
from rapproxy.model.service import LbPolicy


def leaf_paths(cls: type[Any] = RapproxyConfiguration, prefix: str = "") -> list[str]:
    """Every leaf setting as its camelCase path, straight from the dataclasses."""
    paths = []
    for f in dataclasses.fields(cls):
        camel = f.name.split("_")[0] + "".join(p.title() for p in f.name.split("_")[1:])
        path = f"{prefix}.{camel}" if prefix else camel
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            paths.extend(leaf_paths(type(default), path))
        else:
            paths.append(path)
    return paths


def config_error(**kw: Any) -> str:
    with pytest.raises(ConfigError) as error:
        load(kw.get("yaml_text"), kw.get("environ", {}), kw.get("overrides", ()))
    return str(error.value)


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    validate(RapproxyConfiguration())


def test_empty_sources_give_the_defaults() -> None:
    assert load(None, {}) == RapproxyConfiguration()
    assert load("", {}) == RapproxyConfiguration()
    assert from_yaml("") == RapproxyConfiguration()


def test_documented_defaults() -> None:
    config = RapproxyConfiguration()
    assert config.proxy.lb_policy is LbPolicy.RAP
    assert config.rap.overload_threshold == 0.8
    assert config.rap.exit_threshold == 0.7
    assert (config.rap.weights.cpu, config.rap.weights.memory, config.rap.weights.rtt) == (1, 1, 1)
    assert config.rap.stale_after_periods == 3
    assert config.healthz_bind_address == "0.0.0.0:10256"
    assert config.metrics_bind_address == "127.0.0.1:10249"


def test_defaults_yaml_round_trips_through_load() -> None:
    text = defaults_yaml()
    document = yaml.safe_load(text)
    assert document["apiVersion"] == API_VERSION
    assert document["kind"] == KIND
    assert load(text, {}) == RapproxyConfiguration()
    assert from_yaml(text) == RapproxyConfiguration()


def test_to_mapping_is_plain_data() -> None:
    mapping = to_mapping(RapproxyConfiguration())
    json.dumps(mapping)
    assert mapping["proxy"]["lbPolicy"] == "rap"
    assert mapping["proxy"]["dialTimeouts"] == [0.25, 0.5, 1.0, 2.0]


def test_reference_rows_cover_every_leaf_field_with_a_meaning() -> None:
    rows = reference_rows()
    assert [path for path, _, _ in rows] == leaf_paths()
    for path, default, meaning in rows:
        assert default.startswith("`") and default.endswith("`"), path
        assert meaning.strip(), f"{path} has no doc"


def test_reference_rows_show_defaults_readably() -> None:
    rows = {path: default for path, default, _ in reference_rows()}
    assert rows["proxy.lbPolicy"] == "`rap`"
    assert rows["hostnameOverride"] == '`""`'
    assert rows["proxy.dialTimeouts"] == "`0.25, 0.5, 1.0, 2.0`"
    assert rows["rap.weights.cpu"] == "`1.0`"


# -- YAML ----------------------------------------------------------------------------------------


def test_yaml_uses_camel_case_nested_sections() -> None:
    config = from_yaml(
        f"""
apiVersion: {API_VERSION}
kind: {KIND}
hostnameOverride: node-a
clientConnection:
  kubeconfig: /etc/kubeconfig
iptables:
  minSyncPeriod: 2
  nodePortAddresses: [192.168.0.0/16, "fd00::/8"]
proxy:
  tcpPort: 16001
  lbPolicy: least-conn
  dialTimeouts: [0.1, 1]
rap:
  overloadThreshold: 0.9
  weights:
    rtt: 2
bps:
  enabled: false
logging:
  format: json
"""
    )
    assert config.hostname_override == "node-a"
    assert config.client_connection.kubeconfig == "/etc/kubeconfig"
    assert config.iptables.min_sync_period == 2.0
    assert config.iptables.node_port_addresses == ("192.168.0.0/16", "fd00::/8")
    assert config.proxy.tcp_port == 16001
    assert config.proxy.lb_policy is LbPolicy.LEAST_CONN
    assert config.proxy.dial_timeouts == (0.1, 1.0)
    assert config.rap.overload_threshold == 0.9
    assert config.rap.weights.rtt == 2.0
    assert config.rap.weights.cpu == 1.0  # untouched siblings keep their defaults
    assert config.bps.enabled is False
    assert config.logging.format == "json"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("45", 45.0),
        ("0.25", 0.25),
    ],
)
def test_durations_accept_go_style_strings_and_numbers(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds
    assert from_yaml(f"proxy: {{idleTimeout: '{text}'}}").proxy.idle_timeout == seconds


@pytest.mark.parametrize("number", [0, 3, 2.5])
def test_durations_accept_plain_numbers(number: float) -> None:
    assert parse_duration(number, "x") == float(number)


@pytest.mark.parametrize(
    "bad", ["1x", "fast", "", "-1s", "-3", "1s2", True, None, [1], "nan", "inf"]
)
def test_bad_durations_name_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^iptables\.syncPeriod: "):
        parse_duration(bad, "iptables.syncPeriod")


def test_unknown_field_names_its_path_and_lists_the_known_ones() -> None:
    message = config_error(yaml_text="rap:\n  overloadTreshold: 0.9\n")
    assert message.startswith("rap.overloadTreshold: unknown field")
    assert "overloadThreshold" in message
    assert "exitThreshold" in message


def test_unknown_top_level_field_is_refused() -> None:
    message = config_error(yaml_text="proxyMode: iptables\n")
    assert message.startswith("proxyMode: unknown field")
    assert "healthzBindAddress" in message


def test_snake_case_keys_are_unknown_fields() -> None:
    assert config_error(yaml_text="rap: {overload_threshold: 0.9}").startswith(
        "rap.overload_threshold: unknown field"
    )


def test_non_string_keys_are_unknown_fields_not_a_crash() -> None:
    assert "unknown field" in config_error(yaml_text="1: 2\nfoo: 3\n")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("rap: 5", "rap: must be a mapping"),
        ("proxy: {tcpPort: '15001x'}", "proxy.tcpPort: "),
        ("proxy: {tcpPort: 1.5}", "proxy.tcpPort: "),
        ("proxy: {tcpPort: true}", "proxy.tcpPort: "),
        ("bps: {enabled: maybe}", "bps.enabled: "),
        ("hostnameOverride: 5", "hostnameOverride: "),
        ("proxy: {lbPolicy: fastest}", "proxy.lbPolicy: "),
        ("proxy: {dialTimeouts: 5}", "proxy.dialTimeouts: must be a list"),
        ("proxy: {dialTimeouts: [1, soon]}", "proxy.dialTimeouts[1]: "),
        ("rap: {weights: {cpu: [1]}}", "rap.weights.cpu: "),
        ("rap: {weights: {cpu: -1}}", "rap.weights.cpu: "),
        ("rap: {weights: {cpu: .nan}}", "rap.weights.cpu: "),
        ("iptables: {retryPeriod: -1}", "iptables.retryPeriod: "),
        ("bps: {readyGrace: -5}", "bps.readyGrace: "),
    ],
)
def test_wrongly_typed_values_name_the_field(text: str, field: str) -> None:
    assert config_error(yaml_text=text).startswith(field)


def test_lb_policy_error_lists_the_choices() -> None:
    message = config_error(yaml_text="proxy: {lbPolicy: fastest}")
    assert "round-robin" in message and "least-conn" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rap: [", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("apiVersion: v1\n", "apiVersion: "),
        ("kind: KubeProxyConfiguration\n", "kind: "),
    ],
)
def test_documents_that_are_not_a_configuration_are_refused(text: str, message: str) -> None:
    assert message in config_error(yaml_text=text)
    with pytest.raises(ConfigError, match=message):
        from_yaml(text)


def test_booleans_and_lists_accept_text_forms() -> None:
    config = from_mapping(
        {"bps": {"enabled": "no"}, "iptables": {"nodePortAddresses": "10.0.0.0/8, fd00::/8"}}
    )
    assert config.bps.enabled is False
    assert config.iptables.node_port_addresses == ("10.0.0.0/8", "fd00::/8")


# -- environment and --set --------------------------------------------------------------------------


def test_every_leaf_field_has_an_environment_variable() -> None:
    names = env_variable_names()
    assert sorted(names.values()) == sorted(leaf_paths())
    assert names["RAPPROXY_RAP_OVERLOAD_THRESHOLD"] == "rap.overloadThreshold"
    assert names["RAPPROXY_HEALTHZ_BIND_ADDRESS"] == "healthzBindAddress"
    assert names["RAPPROXY_RAP_WEIGHTS_RTT"] == "rap.weights.rtt"
    assert names["RAPPROXY_PROXY_UDP_PORT_RANGE"] == "proxy.udpPortRange"
    assert names["RAPPROXY_CLIENT_CONNECTION_REQUEST_TIMEOUT"] == "clientConnection.requestTimeout"


def test_environment_variables_set_typed_values() -> None:
    config = load(
        None,
        {
            "RAPPROXY_RAP_OVERLOAD_THRESHOLD": "0.9",
            "RAPPROXY_PROXY_TCP_PORT": "16001",
            "RAPPROXY_BPS_ENABLED": "false",
            "RAPPROXY_PROXY_DIAL_TIMEOUTS": "0.5, 1s",
            "RAPPROXY_IPTABLES_SYNC_PERIOD": "1m",
            "RAPPROXY_PROXY_LB_POLICY": "random",
            "RAPPROXY_HOSTNAME_OVERRIDE": "node-7",
            "UNRELATED": "x",
        },
    )
    assert config.rap.overload_threshold == 0.9
    assert config.proxy.tcp_port == 16001
    assert config.bps.enabled is False
    assert config.proxy.dial_timeouts == (0.5, 1.0)
    assert config.iptables.sync_period == 60.0
    assert config.proxy.lb_policy is LbPolicy.RANDOM
    assert config.hostname_override == "node-7"


def test_environment_overrides_the_file_and_set_overrides_both() -> None:
    text = "rap:\n  overloadThreshold: 0.85\n  exitThreshold: 0.6\n"
    env = {"RAPPROXY_RAP_OVERLOAD_THRESHOLD": "0.9"}
    assert load(text, {}).rap.overload_threshold == 0.85
    assert load(text, env).rap.overload_threshold == 0.9
    config = load(text, env, ["rap.overloadThreshold=0.95"])
    assert config.rap.overload_threshold == 0.95
    assert config.rap.exit_threshold == 0.6  # the file's sibling survives


def test_set_overrides_apply_in_order_and_parse_yaml_values() -> None:
    config = load(
        None,
        {},
        [
            "proxy.tcpPort=16001",
            "proxy.tcpPort=16002",
            "proxy.dialTimeouts=[0.1, 0.2]",
            "bps.enabled=false",
            "hostnameOverride=",
            "iptables.syncPeriod=1m30s",
        ],
    )
    assert config.proxy.tcp_port == 16002
    assert config.proxy.dial_timeouts == (0.1, 0.2)
    assert config.bps.enabled is False
    assert config.hostname_override == ""
    assert config.iptables.sync_period == 90.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rap.overloadThreshold", "expected path=value"),
        ("rap.bogus=1", "rap.bogus: unknown field"),
        ("rap.overloadThreshold=[", "rap.overloadThreshold: '[' is not a duration"),
        ("rap.overloadThreshold.x=1", "rap.overloadThreshold: "),
    ],
)
def test_bad_set_overrides_are_config_errors(override: str, message: str) -> None:
    assert message in config_error(overrides=[override])


def test_set_into_a_scalar_from_the_file_is_refused() -> None:
    message = config_error(
        yaml_text="rap:\n  overloadThreshold: 0.9\n", overrides=["rap.overloadThreshold.x=1"]
    )
    assert "is not a section" in message


def test_bad_environment_value_names_the_field() -> None:
    assert config_error(environ={"RAPPROXY_PROXY_TCP_PORT": "lots"}).startswith("proxy.tcpPort: ")


# -- validation rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["healthzBindAddress=10256"], "healthzBindAddress"),
        (["healthzBindAddress=0.0.0.0:http"], "healthzBindAddress"),
        (["healthzBindAddress=host:10256"], "healthzBindAddress"),
        (["healthzBindAddress=0.0.0.0:70000"], "healthzBindAddress"),
        (["metricsBindAddress=127.0.0.1"], "metricsBindAddress"),
        (["clientConnection.requestTimeout=0"], "clientConnection.requestTimeout"),
        (["proxy.tcpPort=0"], "proxy.tcpPort"),
        (["proxy.tcpPort=65536"], "proxy.tcpPort"),
        (["proxy.tcpPort=15100"], "proxy.tcpPort"),
        (["proxy.udpPortRange=15100"], "proxy.udpPortRange"),
        (["proxy.udpPortRange=16000-15000"], "proxy.udpPortRange"),
        (["proxy.udpPortRange=0-100"], "proxy.udpPortRange"),
        (["proxy.udpPortRange=60000-70000"], "proxy.udpPortRange"),
        (["proxy.listenAddress=localhost"], "proxy.listenAddress"),
        (["proxy.dialTimeouts=[]"], "proxy.dialTimeouts"),
        (["proxy.dialTimeouts=[1, 0]"], "proxy.dialTimeouts[1]"),
        (["proxy.idleTimeout=0"], "proxy.idleTimeout"),
        (["proxy.udpIdleTimeout=0"], "proxy.udpIdleTimeout"),
        (["proxy.maxConnections=0"], "proxy.maxConnections"),
        (["proxy.maxUdpFlows=0"], "proxy.maxUdpFlows"),
        (["proxy.drainTimeout=-1"], "proxy.drainTimeout"),
        (["proxy.drainTimeout=.inf"], "proxy.drainTimeout"),
        (["proxy.handoverSocket=off"], "proxy.handoverSocket"),
        (["proxy.handoverSocket=relative.sock"], "proxy.handoverSocket"),
        (["proxy.handoverSocket=@"], "proxy.handoverSocket"),
        (["proxy.handoverSocket=/" + "x" * 107], "proxy.handoverSocket"),
        (["iptables.syncPeriod=0"], "iptables.syncPeriod"),
        (["iptables.retryPeriod=0"], "iptables.retryPeriod"),
        (["iptables.minSyncPeriod=60"], "iptables.minSyncPeriod"),
        (["iptables.nodePortAddresses=[10.0.0.0/33]"], "iptables.nodePortAddresses[0]"),
        (["rap.overloadThreshold=0"], "rap.overloadThreshold"),
        (["rap.overloadThreshold=1.5"], "rap.overloadThreshold"),
        (["rap.exitThreshold=0"], "rap.exitThreshold"),
        (["rap.exitThreshold=0.9"], "rap.exitThreshold"),
        (["rap.rttEwmaAlpha=0"], "rap.rttEwmaAlpha"),
        (["rap.rttEwmaAlpha=2"], "rap.rttEwmaAlpha"),
        (["rap.weights.memory=-0.5"], "rap.weights.memory"),
        (["rap.topCandidates=0"], "rap.topCandidates"),
        (["rap.telemetryInterval=0"], "rap.telemetryInterval"),
        (["rap.staleAfterPeriods=0"], "rap.staleAfterPeriods"),
        (["rap.telemetryPort=0"], "rap.telemetryPort"),
        (["rap.telemetryPort=70000"], "rap.telemetryPort"),
        (["bps.leaseDuration=0.5"], "bps.leaseDuration"),
        (["bps.renewDeadline=0.5"], "bps.renewDeadline"),
        (["bps.retryPeriod=0.5"], "bps.retryPeriod"),
        (["bps.renewDeadline=20"], "bps"),
        (["bps.retryPeriod=10"], "bps"),
        (["bps.activationTimeout=0"], "bps.activationTimeout"),
        (["logging.format=xml"], "logging.format"),
        (["logging.level=verbose"], "logging.level"),
    ],
)
def test_every_validation_rule_names_its_field(overrides: list[str], field: str) -> None:
    assert config_error(overrides=overrides).startswith(f"{field}:")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("", "@rapproxy-handover-15001"),
        ("@node-proxy", "@node-proxy"),
        ("/run/rapproxy/handover.sock", "/run/rapproxy/handover.sock"),
        ("disabled", None),
    ],
)
def test_handover_address_defaults_to_an_abstract_name_per_proxy_port(
    value: str, address: str | None
) -> None:
    assert handover_address(ProxySettings(handover_socket=value)) == address


def test_valid_edge_values_are_accepted() -> None:
    config = load(
        None,
        {},
        [
            "healthzBindAddress=[::]:10256",
            "metricsBindAddress=127.0.0.1:0",
            "rap.overloadThreshold=1",
            "rap.exitThreshold=1",
            "rap.weights.cpu=0",
            "iptables.minSyncPeriod=0",
            "iptables.minSyncPeriod=30",
            "configSyncPeriod=0",
            "proxy.tcpPort=15099",
        ],
    )
    assert config.iptables.min_sync_period == 30.0
    assert config.healthz_bind_address == "[::]:10256"  # not YAML: taken as text


def test_host_port_and_port_range_parsers() -> None:
    assert parse_host_port("[::1]:10249", "x") == ("::1", 10249)
    assert parse_host_port("0.0.0.0:10256", "x") == ("0.0.0.0", 10256)
    assert parse_port_range("15100-15999", "x") == range(15100, 16000)
    assert parse_port_range(" 1 - 1 ", "x") == range(1, 2)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (0, "must be contiguous bits"),
        (0x10000, "must be contiguous bits"),
        (0x50000, "must be contiguous bits"),
        (0x1F000, "holds dataplane.masqueradeBit"),
    ],
)
def test_a_node_mark_field_that_cannot_carry_a_node_is_refused(mask: int, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^dataplane\.nodeMarkMask: .*{message}"):
        from_mapping({"dataplane": {"nodeMarkMask": mask}})
    assert from_yaml("dataplane: {nodeMarkMask: 0x3f000000}").dataplane.node_mark_mask == (
        0x3F000000
    )
