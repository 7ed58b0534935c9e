//! Configuration parsing and validation: valid files load with the right values, and every
//! malformed case is reported as `FILE:LINE:COL: message` pointing at the offending text.

use std::path::Path;

use session_common::wire::{
    Action, CtState, FAMILY_IPV4, FAMILY_IPV6, Hook, MAX_RULES, NS_PER_SEC, Timeout, proto,
    rule_flags, settings_flags,
};
use session_user::{
    bpf::kernel_log::KernelLogLevel,
    policy::{
        compile::{self, CompileError},
        config::{self, Config, ConfigError},
    },
};

const FILE: &str = "/etc/session/test.toml";

fn parse_ok(text: &str) -> Config {
    config::parse(Path::new(FILE), text)
        .unwrap_or_else(|error| panic!("valid config rejected: {error}\n---\n{text}"))
}

/// Requires `text` to be refused at `at` (line, column) with a message that starts with
/// `message`.
fn assert_refused_at(text: &str, at: (usize, usize), message: &str) {
    let error = parse_err(text);
    assert_eq!(
        (error.line, error.column),
        at,
        "{text}: error at the wrong place: {error}"
    );
    assert!(
        error.message.starts_with(message),
        "{text}: unexpected message: {}",
        error.message
    );
}

fn parse_err(text: &str) -> ConfigError {
    match config::parse(Path::new(FILE), text) {
        Ok(_) => panic!("invalid config accepted:\n---\n{text}"),
        Err(error) => error,
    }
}

/// 1-based line and column of the `nth` (0-based) occurrence of `needle` in `text`.
fn position(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let (offset, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("test bug: `{needle}` occurs fewer than {} times", nth + 1));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Asserts the error points at the `nth` occurrence of `at` and its message contains `says`.
fn expect_error_at(text: &str, at: &str, nth: usize, says: &str) {
    let error = parse_err(text);
    let (line, column) = position(text, at, nth);
    let rendered = error.to_string();
    assert_eq!(
        (error.line, error.column),
        (line, column),
        "error `{rendered}` should point at `{at}` (occurrence {nth}) in:\n{text}"
    );
    assert!(
        rendered.starts_with(&format!("{FILE}:{line}:{column}: ")),
        "error must render as FILE:LINE:COL: message, got `{rendered}`"
    );
    assert!(
        error.message.to_lowercase().contains(&says.to_lowercase()),
        "message `{}` should mention `{says}`",
        error.message
    );
    assert!(
        !error.message.contains('\n'),
        "message must be one line: {:?}",
        error.message
    );
}

fn expect_error(text: &str, at: &str, says: &str) {
    expect_error_at(text, at, 0, says);
}

// ---------------------------------------------------------------- valid files

const FULL: &str = r#"
interfaces = ["eth0", "veth-lab1"]

[limits]
max_sessions = 4096

[timeouts]
tcp_syn_sent = 60
tcp_established = 3600
udp_unreplied = 15
udp_replied = 90
icmp = 10
generic = 100

[tracking]
tcp_window_check = true
tcp_liberal = true
tcp_loose = true

[policy]
inbound = "drop"
outbound = "accept"

[sets]
lab = ["198.18.0.0/15", "2001:2::/48"]
admins = ["192.0.2.7"]

[[rule]]
name = "return-traffic"
state = ["established", "related"]
action = "accept"

[[rule]]
name = "web"
state = ["new"]
direction = "in"
iface = ["eth0"]
family = "ipv4"
proto = "tcp"
src = ["@lab", "203.0.113.0/24"]
dst = ["198.18.0.2"]
sport = ["1024-65535"]
dport = [80, 443, "8000-8080"]
action = "accept"

[[rule]]
name = "ping6"
state = ["new"]
direction = "any"
proto = "icmpv6"
icmp_type = ["echo-request", 135]
action = "accept"

[[rule]]
name = "no-gre"
proto = 47
direction = "out"
action = "drop"
"#;

#[test]
fn full_config_parses_with_every_value() {
    let config = parse_ok(FULL);
    assert_eq!(config.interfaces, ["eth0", "veth-lab1"]);
    assert_eq!(config.max_sessions, 4096);
    let timeout = |which: Timeout| config.settings.timeout(which) / NS_PER_SEC;
    assert_eq!(timeout(Timeout::TcpSynSent), 60);
    assert_eq!(timeout(Timeout::TcpEstablished), 3600);
    assert_eq!(timeout(Timeout::UdpUnreplied), 15);
    assert_eq!(timeout(Timeout::UdpReplied), 90);
    assert_eq!(timeout(Timeout::Icmp), 10);
    assert_eq!(timeout(Timeout::Generic), 100);
    assert_eq!(
        timeout(Timeout::TcpTimeWait),
        120,
        "unset timeouts keep the kernel default"
    );
    assert!(config.settings.has(settings_flags::TCP_WINDOW_CHECK));
    assert!(config.settings.has(settings_flags::TCP_LIBERAL));
    assert!(config.settings.has(settings_flags::TCP_LOOSE));
    assert_eq!(config.policy.inbound, Action::Drop);
    assert_eq!(config.policy.outbound, Action::Accept);
    let rules = &config.policy.rules;
    assert_eq!(rules.len(), 4);

    assert_eq!(rules[0].name, "return-traffic");
    assert_eq!(
        rules[0].states,
        CtState::Established.bit() | CtState::Related.bit()
    );
    assert_eq!(
        rules[0].hooks,
        Hook::Ingress.bit(),
        "direction defaults to in"
    );
    assert_eq!(rules[0].action, Action::Accept);

    let web = &rules[1];
    assert_eq!(web.states, CtState::New.bit());
    assert_eq!(web.ifaces, ["eth0"]);
    assert_eq!(web.family, FAMILY_IPV4);
    assert_eq!(web.proto, proto::TCP);
    assert_eq!(web.src.len(), 1, "the one network listed besides the set");
    assert_eq!(
        web.src_sets,
        ["lab"],
        "@lab stays a set: one kernel entry, looked up by the classifier"
    );
    assert_eq!(config.policy.sets["lab"].networks.len(), 2);
    assert_eq!(web.dst.len(), 1);
    assert_eq!(
        web.dst[0].prefix, 128,
        "a bare IPv4 address is a /32 (/128 mapped)"
    );
    assert_eq!(web.sport, [(1024, 65535)]);
    assert_eq!(web.dport, [(80, 80), (443, 443), (8000, 8080)]);
    assert_eq!(web.line, crate_line(FULL, "name = \"web\""));

    let ping6 = &rules[2];
    assert_eq!(ping6.hooks, Hook::Ingress.bit() | Hook::Egress.bit());
    assert_eq!(ping6.proto, proto::ICMPV6);
    assert_eq!(ping6.icmp_types, [128, 135]);

    let gre = &rules[3];
    assert_eq!(gre.proto, 47);
    assert_eq!(gre.hooks, Hook::Egress.bit());
    assert_eq!(gre.action, Action::Drop);
    assert_eq!(gre.states, 0x1f, "no state list matches every state");
}

fn crate_line(text: &str, needle: &str) -> usize {
    position(text, needle, 0).0
}

#[test]
fn empty_config_gets_safe_defaults() {
    let config = parse_ok("");
    assert!(config.interfaces.is_empty());
    assert_eq!(config.max_sessions, 262_144);
    assert_eq!(config.policy.inbound, Action::Drop);
    assert_eq!(config.policy.outbound, Action::Accept);
    assert!(config.policy.rules.is_empty());
    for (which, name, seconds) in Timeout::DEFAULTS {
        assert_eq!(
            config.settings.timeout(which),
            seconds * NS_PER_SEC,
            "{name}"
        );
    }
    assert!(
        config.settings.has(settings_flags::TCP_WINDOW_CHECK),
        "window checking is on by default"
    );
    assert!(!config.settings.has(settings_flags::TCP_LIBERAL));
    assert!(!config.settings.has(settings_flags::TCP_LOOSE));
    assert!(
        config.tc_ingress.is_empty(),
        "every interface is judged by XDP unless the config says otherwise"
    );
}

#[test]
fn tc_ingress_lists_interfaces_once_each() {
    let config = parse_ok(
        "interfaces = [\"eth0\", \"veth-c1\"]\n[attach]\ntc_ingress = [\"veth-c1\", \"veth-c2\", \"veth-c1\"]\n",
    );
    assert_eq!(config.tc_ingress, ["veth-c1", "veth-c2"]);
}

#[test]
fn kernel_default_timeouts_match_nf_conntrack() {
    let defaults = parse_ok("").settings;
    for (which, seconds) in [
        (Timeout::TcpSynSent, 120),
        (Timeout::TcpSynRecv, 60),
        (Timeout::TcpEstablished, 432_000),
        (Timeout::TcpFinWait, 120),
        (Timeout::TcpCloseWait, 60),
        (Timeout::TcpLastAck, 30),
        (Timeout::TcpTimeWait, 120),
        (Timeout::TcpClose, 10),
        (Timeout::TcpSynSent2, 120),
        (Timeout::TcpRetrans, 300),
        (Timeout::TcpUnack, 300),
        (Timeout::UdpUnreplied, 30),
        (Timeout::UdpReplied, 120),
        (Timeout::Icmp, 30),
        (Timeout::Generic, 600),
    ] {
        assert_eq!(defaults.timeout(which), seconds * NS_PER_SEC, "{which:?}");
    }
}

#[test]
fn window_checking_can_be_switched_off() {
    let config = parse_ok("[tracking]\ntcp_window_check = false\n");
    assert!(!config.settings.has(settings_flags::TCP_WINDOW_CHECK));
}

#[test]
fn the_shipped_default_config_is_valid_and_compiles() {
    let text = include_str!("../../config/default.toml");
    let config = parse_ok(text);
    let compiled = compile::compile(&config.policy, |_| None).expect("default policy compiles");
    assert_eq!(compiled.names.len(), config.policy.rules.len());
    assert_eq!(config.policy.inbound, Action::Drop);
}

#[test]
fn errors_render_as_file_line_column_message() {
    let error = parse_err("[policy]\ninbound = \"reject\"\n");
    assert_eq!(error.to_string(), format!("{FILE}:2:11: {}", error.message));
}

// ---------------------------------------------------------------- malformed files

#[test]
fn unknown_top_level_key() {
    expect_error(
        "interfaces = []\nmax_session = 5\n",
        "max_session",
        "unknown field",
    );
}

#[test]
fn unknown_key_in_a_rule() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndports = [22]\n";
    expect_error(text, "dports", "unknown field");
}

#[test]
fn unknown_key_in_a_section() {
    expect_error(
        "[policy]\ninbound = \"drop\"\nforward = \"drop\"\n",
        "forward",
        "unknown field",
    );
    expect_error("[limits]\nmax_flows = 5000\n", "max_flows", "unknown field");
    expect_error(
        "[tracking]\ntcp_strict = true\n",
        "tcp_strict",
        "unknown field",
    );
}

#[test]
fn wrong_type_for_a_value() {
    expect_error(
        "[limits]\nmax_sessions = \"lots\"\n",
        "\"lots\"",
        "invalid type",
    );
    expect_error("interfaces = \"eth0\"\n", "\"eth0\"", "invalid type");
    expect_error(
        "[tracking]\ntcp_loose = \"yes\"\n",
        "\"yes\"",
        "invalid type",
    );
    expect_error(
        "[[rule]]\nname = 7\naction = \"accept\"\n",
        "7",
        "invalid type",
    );
}

#[test]
fn missing_required_rule_keys() {
    let error = parse_err("[[rule]]\nname = \"no-action\"\n");
    assert!(error.message.contains("action"), "{error}");
    assert_eq!(error.line, 1, "{error}");
}

#[test]
fn syntax_error_is_located() {
    // An unterminated string: reported where the closing quote is missing.
    let error = parse_err("[policy]\ninbound = \"drop\n");
    assert_eq!((error.line, error.column), (2, 16), "{error}");
    assert!(
        error.to_string().starts_with(&format!("{FILE}:2:16: ")),
        "{error}"
    );
}

#[test]
fn bad_cidr() {
    let text =
        "[[rule]]\nname = \"a\"\naction = \"accept\"\nsrc = [\"10.0.0.0/8\", \"10.0.0.300\"]\n";
    expect_error(text, "\"10.0.0.300\"", "not an IP address");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndst = [\"2001:db8::/64/1\"]\n";
    expect_error(text, "\"2001:db8::/64/1\"", "");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndst = [\"example.com\"]\n";
    expect_error(text, "\"example.com\"", "not an IP address");
}

#[test]
fn host_bits_set() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nsrc = [\"198.18.0.1/15\"]\n";
    expect_error(text, "\"198.18.0.1/15\"", "host bits");
    let text = "[sets]\nv6 = [\"2001:2::1/48\"]\n";
    expect_error(text, "\"2001:2::1/48\"", "host bits");
}

#[test]
fn prefix_too_long() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nsrc = [\"10.0.0.0/33\"]\n";
    expect_error(text, "\"10.0.0.0/33\"", "prefix");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndst = [\"2001:2::/129\"]\n";
    expect_error(text, "\"2001:2::/129\"", "prefix");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndst = [\"10.0.0.0/-1\"]\n";
    expect_error(text, "\"10.0.0.0/-1\"", "prefix");
}

#[test]
fn port_zero_and_port_above_65535() {
    let rule = |ports: &str| {
        format!("[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"tcp\"\ndport = {ports}\n")
    };
    expect_error(&rule("[22, 0]"), "0]", "port 0");
    expect_error(&rule("[70000]"), "70000", "port 70000");
    expect_error(&rule("[\"1-70000\"]"), "\"1-70000\"", "70000");
    expect_error(&rule("[\"0-10\"]"), "\"0-10\"", "port 0");
    expect_error(&rule("[-5]"), "-5", "port -5");
}

#[test]
fn empty_port_range() {
    let text =
        "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"udp\"\nsport = [53, \"9-3\"]\n";
    expect_error(text, "\"9-3\"", "empty");
}

#[test]
fn malformed_port_range() {
    let rule = |ports: &str| {
        format!("[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"tcp\"\ndport = {ports}\n")
    };
    expect_error(&rule("[\"http\"]"), "\"http\"", "not a port");
    expect_error(&rule("[\"1-x\"]"), "\"1-x\"", "not a port range");
}

#[test]
fn empty_lists() {
    for key in ["state", "iface", "src", "dst"] {
        let text = format!("[[rule]]\nname = \"a\"\naction = \"accept\"\n{key} = []\n");
        expect_error(&text, "[]", "is empty");
    }
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"tcp\"\ndport = []\n";
    expect_error(text, "[]", "is empty");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"icmp\"\nicmp_type = []\n";
    expect_error(text, "[]", "is empty");
    expect_error("[sets]\nnothing = []\n", "[]", "empty");
}

#[test]
fn unknown_set() {
    let text = "[sets]\nlab = [\"198.18.0.0/15\"]\n\n[[rule]]\nname = \"a\"\naction = \"accept\"\nsrc = [\"@lab\", \"@labs\"]\n";
    expect_error(text, "\"@labs\"", "unknown set");
}

#[test]
fn sets_cannot_nest() {
    let text = "[sets]\na = [\"10.0.0.0/8\"]\nb = [\"@a\"]\n";
    expect_error(text, "\"@a\"", "cannot contain other sets");
}

#[test]
fn duplicate_rule_name() {
    let text = "[[rule]]\nname = \"web\"\naction = \"accept\"\n\n[[rule]]\nname = \"ssh\"\naction = \"accept\"\n\n[[rule]]\nname = \"web\"\naction = \"drop\"\n";
    expect_error_at(text, "\"web\"", 1, "duplicate rule name");
}

#[test]
fn invalid_rule_names() {
    expect_error(
        "[[rule]]\nname = \"\"\naction = \"accept\"\n",
        "\"\"",
        "rule name",
    );
    expect_error(
        "[[rule]]\nname = \"has space\"\naction = \"accept\"\n",
        "\"has space\"",
        "rule name",
    );
    let long = "x".repeat(64);
    expect_error(
        &format!("[[rule]]\nname = \"{long}\"\naction = \"accept\"\n"),
        &format!("\"{long}\""),
        "rule name",
    );
    parse_ok(&format!(
        "[[rule]]\nname = \"{}\"\naction = \"accept\"\n",
        "x".repeat(63)
    ));
}

#[test]
fn unknown_state() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nstate = [\"new\", \"establised\"]\n";
    expect_error(text, "\"establised\"", "unknown state");
}

#[test]
fn unknown_action_direction_family_and_protocol() {
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"reject\"\n",
        "\"reject\"",
        "unknown action",
    );
    expect_error(
        "[policy]\noutbound = \"deny\"\n",
        "\"deny\"",
        "unknown action",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\ndirection = \"both\"\n",
        "\"both\"",
        "unknown direction",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\nfamily = \"inet\"\n",
        "\"inet\"",
        "unknown family",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\nproto = \"sctp\"\n",
        "\"sctp\"",
        "unknown protocol",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\nproto = 256\n",
        "256",
        "out of range",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\nproto = 0\n",
        "0\n",
        "out of range",
    );
}

#[test]
fn dport_without_proto() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\ndport = [22]\n";
    expect_error(text, "[22]", "needs `proto");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"icmp\"\nsport = [22]\n";
    expect_error(text, "[22]", "needs `proto");
}

#[test]
fn icmp_type_with_tcp() {
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"tcp\"\nicmp_type = [\"echo-request\"]\n";
    expect_error(text, "[\"echo-request\"]", "icmp_type");
    let text = "[[rule]]\nname = \"a\"\naction = \"accept\"\nicmp_type = [8]\n";
    expect_error(text, "[8]", "icmp_type");
}

#[test]
fn bad_icmp_types() {
    let rule = |proto: &str, types: &str| {
        format!(
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"{proto}\"\nicmp_type = {types}\n"
        )
    };
    expect_error(
        &rule("icmp", "[\"echo-requets\"]"),
        "\"echo-requets\"",
        "unknown ICMP type",
    );
    expect_error(&rule("icmp", "[256]"), "256", "out of range");
    expect_error(
        &rule("icmp", "[\"packet-too-big\"]"),
        "\"packet-too-big\"",
        "unknown ICMP type",
    );
}

#[test]
fn icmp_type_names_resolve_per_protocol() {
    let rule = |proto: &str, name: &str| {
        let config = parse_ok(&format!(
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"{proto}\"\nicmp_type = [\"{name}\"]\n"
        ));
        config.policy.rules[0].icmp_types[0]
    };
    assert_eq!(rule("icmp", "echo-request"), 8);
    assert_eq!(rule("icmp", "echo-reply"), 0);
    assert_eq!(rule("icmp", "destination-unreachable"), 3);
    assert_eq!(rule("icmp", "time-exceeded"), 11);
    assert_eq!(rule("icmpv6", "echo-request"), 128);
    assert_eq!(rule("icmpv6", "echo-reply"), 129);
    assert_eq!(rule("icmpv6", "destination-unreachable"), 1);
    assert_eq!(rule("icmpv6", "packet-too-big"), 2);
    assert_eq!(rule("icmpv6", "time-exceeded"), 3);
    assert_eq!(rule("icmpv6", "parameter-problem"), 4);
}

#[test]
fn timeout_out_of_range() {
    expect_error("[timeouts]\ntcp_established = 0\n", "0", "between 1 and");
    expect_error("[timeouts]\nudp_replied = -3\n", "-3", "between 1 and");
    expect_error("[timeouts]\nicmp = 31536001\n", "31536001", "between 1 and");
    parse_ok("[timeouts]\nicmp = 31536000\ntcp_close = 1\n");
}

#[test]
fn unknown_timeout_name() {
    let text = "[timeouts]\ntcp_syn_sent = 60\ntcp_establised = 60\n";
    expect_error(text, "tcp_establised", "unknown timeout");
}

#[test]
fn max_sessions_out_of_range() {
    expect_error("[limits]\nmax_sessions = 1023\n", "1023", "between 1024");
    expect_error("[limits]\nmax_sessions = 0\n", "0", "between 1024");
    expect_error(
        "[limits]\nmax_sessions = 16777217\n",
        "16777217",
        "between 1024",
    );
    assert_eq!(
        parse_ok("[limits]\nmax_sessions = 1024\n").max_sessions,
        1024
    );
}

#[test]
fn bad_interface_names() {
    expect_error(
        "interfaces = [\"eth0\", \"\"]\n",
        "\"\"",
        "not a valid interface name",
    );
    expect_error(
        "interfaces = [\"a-very-long-interface\"]\n",
        "\"a-very-long-interface\"",
        "not a valid interface name",
    );
    expect_error(
        "[[rule]]\nname = \"a\"\naction = \"accept\"\niface = [\"eth/0\"]\n",
        "\"eth/0\"",
        "not a valid interface name",
    );
    expect_error(
        "[attach]\ntc_ingress = [\"veth 1\"]\n",
        "\"veth 1\"",
        "not a valid interface name",
    );
    expect_error(
        "[attach]\ntc_egress = [\"veth1\"]\n",
        "tc_egress",
        "unknown field",
    );
}

#[test]
fn rule_whose_addresses_can_never_match_its_family() {
    let text = "[[rule]]\nname = \"v6only\"\naction = \"accept\"\nfamily = \"ipv6\"\nsrc = [\"10.0.0.0/8\"]\n";
    expect_error(text, "\"v6only\"", "never match");
}

#[test]
fn errors_point_at_the_right_line_deep_in_a_long_file() {
    let mut text = String::from(FULL);
    text.push_str(
        "\n[[rule]]\nname = \"late\"\naction = \"accept\"\nproto = \"udp\"\ndport = [\"100-50\"]\n",
    );
    expect_error(&text, "\"100-50\"", "empty");
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = "# Überwachung – ünïcödé\n[[rule]]\nname = \"a\"\naction = \"accept\" # ok ✓\nstate = [\"néw\"]\n";
    expect_error(text, "\"néw\"", "unknown state");
    let text = "[[rule]]\nname = \"ü\"\naction = \"accept\"\n";
    expect_error(text, "\"ü\"", "rule name");
}

// ---------------------------------------------------------------- compilation

fn compile_ok(text: &str) -> compile::CompiledPolicy {
    compile::compile(&parse_ok(text).policy, |name| (name == "eth0").then_some(2))
        .expect("policy compiles")
}

#[test]
fn compile_expands_lists_into_one_entry_per_combination() {
    let compiled = compile_ok(
        "[[rule]]\nname = \"a\"\naction = \"accept\"\nproto = \"tcp\"\nsrc = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\ndport = [22, \"80-90\", 443]\n",
    );
    assert_eq!(compiled.entries.len(), 6);
    assert!(
        compiled
            .entries
            .iter()
            .all(|e| e.rule_id == 0 && e.match_flags & rule_flags::PORTS != 0)
    );
    assert!(
        compiled.entries.iter().all(|e| e.family == FAMILY_IPV4),
        "IPv4 networks pin the family"
    );
    assert_eq!(compiled.header.rule_count, 6);
    assert_eq!(compiled.header.default_inbound, Action::Drop as u8);
    assert_eq!(compiled.header.default_outbound, Action::Accept as u8);
    assert_eq!(compile::decode_name(&compiled.names[0]), "a");
}

#[test]
fn compile_skips_address_pairs_of_different_families() {
    let compiled = compile_ok(
        "[[rule]]\nname = \"a\"\naction = \"accept\"\nsrc = [\"10.0.0.0/8\", \"2001:2::/48\"]\ndst = [\"2001:3::/48\"]\n",
    );
    assert_eq!(
        compiled.entries.len(),
        1,
        "v4 src with v6 dst can never match"
    );
    assert_eq!(compiled.entries[0].family, FAMILY_IPV6);
}

#[test]
fn compile_masks_and_ports() {
    let compiled = compile_ok(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\nproto = \"udp\"\nsrc = [\"198.18.0.0/15\"]\niface = [\"eth0\"]\nsport = [53]\n",
    );
    let entry = &compiled.entries[0];
    let mut mask = [0xffu8; 16];
    mask[13] = 0xfe;
    mask[14] = 0;
    mask[15] = 0;
    assert_eq!(entry.src_mask, mask);
    assert_eq!(
        entry.src_net,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 0]
    );
    assert_eq!(entry.dst_mask, [0; 16]);
    assert_eq!((entry.sport_lo, entry.sport_hi), (53, 53));
    assert_eq!((entry.dport_lo, entry.dport_hi), (0, u16::MAX));
    assert_eq!(entry.ifindex, 2);
    assert_eq!(entry.action, Action::Drop as u8);
    assert_eq!(entry.proto, proto::UDP);
}

#[test]
fn compile_reports_unknown_interfaces() {
    let config = parse_ok("[[rule]]\nname = \"a\"\naction = \"accept\"\niface = [\"eth9\"]\n");
    match compile::compile(&config.policy, |_| None) {
        Err(CompileError::UnknownInterface { rule, line, iface }) => {
            assert_eq!((rule.as_str(), line, iface.as_str()), ("a", 2, "eth9"));
        }
        other => panic!("expected an unknown-interface error, got {other:?}"),
    }
}

#[test]
fn a_policy_with_more_entries_than_a_bank_holds_is_refused_at_the_rule() {
    // 33 ports x 32 networks: more than a bank holds.
    let ports: Vec<String> = (1..=33).map(|p| p.to_string()).collect();
    let nets: Vec<String> = (0..32).map(|i| format!("\"198.18.{i}.0/24\"")).collect();
    let text = format!(
        "[[rule]]\nname = \"small\"\naction = \"accept\"\n\n[[rule]]\nname = \"big\"\naction = \"accept\"\nproto = \"tcp\"\ndport = [{}]\nsrc = [{}]\n",
        ports.join(", "),
        nets.join(", ")
    );
    let needed = 1 + 33 * 32;
    assert!(needed > MAX_RULES as usize, "the test must overflow a bank");
    expect_error_at(
        &text,
        "\"big\"",
        0,
        &format!("brings the policy to {needed} kernel entries, more than the {MAX_RULES}"),
    );
}

#[test]
fn compile_refuses_a_hand_built_policy_that_would_overflow_a_bank() {
    // Config validation stops this first; compile still refuses, because writing past a
    // bank would overwrite the other, active one.
    let mut policy = parse_ok("[[rule]]\nname = \"r\"\naction = \"accept\"\n").policy;
    let rule = policy.rules[0].clone();
    policy.rules = vec![rule; MAX_RULES as usize + 1];
    match compile::compile(&policy, |_| None) {
        Err(CompileError::TooManyEntries { entries, max, .. }) => {
            assert_eq!((entries, max), (u64::from(MAX_RULES) + 1, MAX_RULES));
        }
        other => panic!("expected too many entries, got {other:?}"),
    }
}

#[test]
fn entries_are_counted_exactly_as_compiled() {
    let cases = [
        "src = [\"198.18.0.0/24\", \"2001:2::/64\"]\ndst = [\"198.19.0.0/16\"]\nproto = \"udp\"\ndport = [53, \"5000-5010\"]",
        "family = \"ipv6\"\nsrc = [\"198.18.0.0/24\", \"2001:2::/64\", \"2001:2:1::/64\"]\nproto = \"icmpv6\"\nicmp_type = [\"echo-request\", 1]",
        "src = [\"198.18.0.0/24\"]\ndst = [\"2001:2::/64\"]",
        "iface = [\"eth0\", \"eth1\"]\nproto = \"tcp\"\nsport = [1, 2, 3]\ndport = [4, 5]",
        "",
    ];
    for matches in cases {
        let config = parse_ok(&format!(
            "[[rule]]\nname = \"r\"\naction = \"accept\"\n{matches}\n"
        ));
        let compiled = compile::compile(&config.policy, |_| Some(1)).expect("compiles");
        assert_eq!(
            compile::entry_count(&config.policy.rules[0]),
            compiled.entries.len() as u64,
            "for {matches:?}"
        );
    }
}

#[test]
fn ipv6_family_rule_compiles_with_family_set() {
    let compiled = compile_ok("[[rule]]\nname = \"a\"\naction = \"accept\"\nfamily = \"ipv6\"\n");
    assert_eq!(compiled.entries[0].family, FAMILY_IPV6);
    assert_eq!(compiled.entries[0].match_flags, 0);
}

#[test]
fn a_rule_shadowed_by_an_earlier_one_is_warned_about_at_its_name() {
    let text = r#"
[[rule]]
name = "lab-ssh"
proto = "tcp"
src = ["198.18.0.0/15"]
dport = ["20-30"]
action = "accept"

[[rule]]
name = "ops-ssh"
proto = "tcp"
src = ["198.18.4.0/24"]
dport = [22]
state = ["new"]
action = "drop"
"#;
    let config = parse_ok(text);
    assert_eq!(
        config.warnings.len(),
        1,
        "one shadowed rule: {:?}",
        config.warnings
    );
    let warning = &config.warnings[0];
    assert_eq!(
        (warning.line, warning.column),
        position(text, "\"ops-ssh\"", 0),
        "points at the shadowed rule's name"
    );
    assert!(
        warning.message.contains("`ops-ssh` is never used")
            && warning.message.contains("`lab-ssh`"),
        "names both rules: {}",
        warning.message
    );
}

#[test]
fn rules_that_only_overlap_are_not_warned_about() {
    let config = parse_ok(
        r#"
[[rule]]
name = "web-v4"
proto = "tcp"
dst = ["198.18.0.0/24"]
dport = [80, 443]
action = "accept"

[[rule]]
name = "web-wider"
proto = "tcp"
dst = ["198.18.0.0/16"]
dport = [80]
action = "drop"

[[rule]]
name = "any-udp"
proto = "udp"
action = "drop"

[[rule]]
name = "established"
state = ["established"]
action = "accept"
"#,
    );
    assert!(
        config.warnings.is_empty(),
        "no rule is fully covered: {:?}",
        config.warnings
    );
}

// ---------------------------------------------------------------- metrics

#[test]
fn metrics_are_off_unless_configured() {
    assert_eq!(parse_ok("").metrics, None);
}

#[test]
fn metrics_listen_address_parses() {
    let config = parse_ok("[metrics]\nlisten = \"127.0.0.1:9640\"\n");
    assert_eq!(config.metrics, Some("127.0.0.1:9640".parse().unwrap()));
    let config = parse_ok("[metrics]\nlisten = \"[::1]:9640\"\n");
    assert_eq!(config.metrics, Some("[::1]:9640".parse().unwrap()));
}

#[test]
fn bad_metrics_listen_addresses_are_located() {
    expect_error(
        "[metrics]\nlisten = \"localhost:9640\"\n",
        "\"localhost:9640\"",
        "not a listen address",
    );
    expect_error(
        "[metrics]\nlisten = \"127.0.0.1\"\n",
        "\"127.0.0.1\"",
        "IP:PORT",
    );
    expect_error(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        "\"127.0.0.1:0\"",
        "port 0",
    );
    expect_error("[metrics]\nport = 9640\n", "port", "unknown field");
}

#[test]
fn kernel_log_level_defaults_to_warn_and_takes_every_level_name() {
    assert_eq!(parse_ok("").kernel_log_level, KernelLogLevel::Warn);
    assert_eq!(
        parse_ok("[logging]\n").kernel_log_level,
        KernelLogLevel::Warn
    );
    for (level, name) in KernelLogLevel::ALL {
        let config = parse_ok(&format!("[logging]\nkernel_level = \"{name}\"\n"));
        assert_eq!(config.kernel_log_level, level, "kernel_level = \"{name}\"");
    }
}

#[test]
fn bad_kernel_log_levels_are_located() {
    expect_error(
        "[logging]\nkernel_level = \"verbose\"\n",
        "\"verbose\"",
        "use one of off, error, warn, info, debug, trace",
    );
    expect_error("[logging]\nkernel = \"debug\"\n", "kernel", "unknown field");
}

#[test]
fn limits_parse_into_the_rule_and_bad_ones_are_refused_where_they_are_written() {
    let config = parse_ok(
        r#"
[limits]
max_tracked_sources = 4096

[sets]
abusers = []

[[rule]]
name = "ssh"
state = ["new"]
proto = "tcp"
dport = [22]
action = "accept"
limit = { max_src_conn = 3, max_src_conn_rate = "10/1m", src_prefix_v6 = 64, overload = "@abusers", overload_timeout = 60, overload_flush = "rule" }
"#,
    );
    assert_eq!(config.max_tracked_sources, 4096);
    let limit = config.policy.rules[0]
        .limit
        .as_ref()
        .expect("the rule has limits");
    assert_eq!(
        (limit.max_src_conn, limit.rate, limit.max_conn),
        (3, Some((10, 60_000)), 0)
    );
    assert_eq!((limit.src_prefix_v4, limit.src_prefix_v6), (32, 64));
    assert_eq!(limit.overload.as_deref(), Some("abusers"));
    assert_eq!(limit.overload_timeout, 60);
    assert_eq!(
        limit.flush,
        session_user::policy::limits::OverloadFlush::Rule
    );
    assert_eq!(
        parse_ok("").max_tracked_sources,
        session_common::limits::DEFAULT_MAX_TRACKED_SOURCES
    );
    for (text, at, message) in [
        (
            "[limits]\nmax_tracked_sources = 10\n",
            (2, 23),
            "max_tracked_sources must be between 1024 and 16777216, got 10",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nlimit = { max_src_conn = 0 }\n",
            (4, 26),
            "max_src_conn must be between 1 and 16777216 sessions, got 0",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nlimit = { src_prefix_v4 = 33, max_conn = 5 }\n",
            (4, 27),
            "src_prefix_v4 must be a prefix length of 0 to 32, got 33",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nlimit = { max_conn = 5, overload_timeout = 60 }\n",
            (4, 44),
            "overload_timeout needs `overload = \"SET\"`",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nlimit = { }\n",
            (4, 9),
            "`limit` sets no cap",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"accept\"\nlimit = { max_src_conn = 2, overload_flush = \"all\" }\n",
            (4, 46),
            "overload_flush needs `overload = \"SET\"`",
        ),
    ] {
        assert_refused_at(text, at, message);
    }
}

#[test]
fn syn_defence_parses_its_ports_and_rate_and_refuses_bad_ones_where_they_are_written() {
    let config = parse_ok("[syn_defence]\nports = [443, 80, 443]\nabove = 2000\n");
    assert_eq!(
        config.syn_defence.ports,
        [80, 443],
        "sorted, without duplicates"
    );
    assert_eq!(config.syn_defence.above, 2000);
    assert!(
        config.settings.flags & session_common::wire::settings_flags::SYN_DEFENCE != 0,
        "the programs are told to look ports up"
    );
    let off = parse_ok("");
    assert!(off.syn_defence.ports.is_empty());
    assert_eq!(
        off.settings.flags & session_common::wire::settings_flags::SYN_DEFENCE,
        0,
        "without the section nothing is looked up"
    );
    for (text, at, message) in [
        (
            "[syn_defence]\nports = []\n",
            (2, 9),
            "[syn_defence] ports must list 1 to 1024",
        ),
        (
            "[syn_defence]\nports = [22, 70000]\n",
            (2, 14),
            "port 70000 is out of range",
        ),
        (
            "[syn_defence]\nports = [22]\nabove = 0\n",
            (3, 9),
            "above must be 1 to 100000000",
        ),
        (
            "[syn_defence]\nports = [22]\nbelow = 5\n",
            (3, 1),
            "unknown field `below`",
        ),
    ] {
        assert_refused_at(text, at, message);
    }
}
