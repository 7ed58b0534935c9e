//! TOML pieces that the tests' policies are put together from with `concat!`, so that a
//! table or rule many tests need is written once. Macros rather than constants because
//! `concat!` and `format!`'s template take only literals, and the tests keep their
//! policies as `const` strings. Each piece starts on a new line, so that pieces and a
//! test's own TOML join in any order.

/// The `[policy]` table of a host: inbound dropped unless a rule accepts it, outbound
/// accepted.
#[macro_export]
macro_rules! inbound_drop_policy {
    () => {
        r#"
[policy]
inbound = "drop"
outbound = "accept"
"#
    };
}

/// A rule named `$name` applying `$action` ("accept" or "drop") to packets in the ct
/// states of the TOML list `$states` (`["established", "related"]`).
#[macro_export]
macro_rules! state_rule {
    ($name:literal, [$($states:tt)*], $action:literal) => {
        concat!(
            "\n[[rule]]\nname = ",
            stringify!($name),
            "\nstate = ",
            stringify!([$($states)*]),
            "\naction = ",
            stringify!($action),
            "\n"
        )
    };
}

/// A rule named `$name` accepting established and related traffic: return traffic, and
/// the ICMP errors about it.
#[macro_export]
macro_rules! return_traffic_rule {
    ($name:literal) => {
        $crate::state_rule!($name, ["established", "related"], "accept")
    };
}

/// A rule named "invalid" dropping what the tracker finds invalid.
#[macro_export]
macro_rules! invalid_drop_rule {
    () => {
        $crate::state_rule!("invalid", ["invalid"], "drop")
    };
}

/// A rule named `$name` accepting untracked packets (IPv6 neighbour discovery).
#[macro_export]
macro_rules! untracked_accept_rule {
    ($name:literal) => {
        $crate::state_rule!($name, ["untracked"], "accept")
    };
}

/// A rule named `$name` applying `$action` ("accept" or "drop") to new flows of `$proto`
/// ("tcp" or "udp") to port `$port`, or to the ports and ranges of a TOML list
/// (`[80, "8000-8080"]`).
#[macro_export]
macro_rules! new_flow_rule {
    ($name:literal, $proto:literal, [$($ports:tt)*], $action:literal) => {
        concat!(
            "\n[[rule]]\nname = ",
            stringify!($name),
            "\nstate = [\"new\"]\nproto = ",
            stringify!($proto),
            "\ndport = ",
            stringify!([$($ports)*]),
            "\naction = ",
            stringify!($action),
            "\n"
        )
    };
    ($name:literal, $proto:literal, $port:literal, $action:literal) => {
        $crate::new_flow_rule!($name, $proto, [$port], $action)
    };
}

/// A rule named `$name` accepting new flows of `$proto` ("tcp" or "udp") to `$port`, a
/// port or a TOML list as [`new_flow_rule!`] takes.
#[macro_export]
macro_rules! accept_new_rule {
    ($name:literal, $proto:literal, $port:tt) => {
        $crate::new_flow_rule!($name, $proto, $port, "accept")
    };
}

/// A rule named `$name` accepting new echo requests of `$proto` ("icmp" or "icmpv6").
#[macro_export]
macro_rules! echo_request_rule {
    ($name:literal, $proto:literal) => {
        concat!(
            "\n[[rule]]\nname = ",
            stringify!($name),
            "\nstate = [\"new\"]\nproto = ",
            stringify!($proto),
            "\nicmp_type = [\"echo-request\"]\naction = \"accept\"\n"
        )
    };
}

/// Rules "ping" and "ping6" accepting new ICMP and ICMPv6 echo requests.
#[macro_export]
macro_rules! ping_rules {
    () => {
        concat!(
            $crate::echo_request_rule!("ping", "icmp"),
            $crate::echo_request_rule!("ping6", "icmpv6")
        )
    };
}

/// An empty set `abusers`, which a rule's `limit` overloads sources into, and a rule named
/// "banned" dropping its members' new flows: what an overload needs to stop anything.
/// Goes before the limited rule, as a ban must.
#[macro_export]
macro_rules! overload_ban_rules {
    () => {
        r#"
[sets]
abusers = []

[[rule]]
name = "banned"
state = ["new"]
src = ["@abusers"]
action = "drop"
"#
    };
}
