//! Pieces of the TOML policies the tests and benchmarks run, as macros that expand to
//! string literals, so that a test writes its policy as `concat!` of the pieces it needs
//! (its own rules written out beside them) and the common ones are written once.

/// The `[policy]` of the host most tests protect: inbound dropped, outbound accepted.
#[macro_export]
macro_rules! drop_inbound {
    () => {
        "\n[policy]\ninbound = \"drop\"\noutbound = \"accept\"\n"
    };
}

/// A rule named `$name` that accepts return traffic (`established` and `related`).
#[macro_export]
macro_rules! accept_return_traffic {
    ($name:literal) => {
        concat!(
            "\n[[rule]]\nname = \"",
            $name,
            "\"\nstate = [\"established\", \"related\"]\naction = \"accept\"\n"
        )
    };
}

/// A rule named `$name` that drops `invalid` packets.
#[macro_export]
macro_rules! drop_invalid {
    ($name:literal) => {
        concat!(
            "\n[[rule]]\nname = \"",
            $name,
            "\"\nstate = [\"invalid\"]\naction = \"drop\"\n"
        )
    };
}

/// A rule named `$name` that accepts `untracked` packets (IPv6 neighbour discovery).
#[macro_export]
macro_rules! accept_untracked {
    ($name:literal) => {
        concat!(
            "\n[[rule]]\nname = \"",
            $name,
            "\"\nstate = [\"untracked\"]\naction = \"accept\"\n"
        )
    };
}

/// A rule named `$name` that accepts new TCP connections to port `$port`.
#[macro_export]
macro_rules! accept_new_tcp {
    ($name:literal, $port:literal) => {
        concat!(
            "\n[[rule]]\nname = \"",
            $name,
            "\"\nstate = [\"new\"]\nproto = \"tcp\"\ndport = [",
            $port,
            "]\naction = \"accept\"\n"
        )
    };
}

/// Rules `ping` and `ping6` that accept new ICMP and ICMPv6 echo requests.
#[macro_export]
macro_rules! accept_pings {
    () => {
        concat!(
            "\n[[rule]]\nname = \"ping\"\nstate = [\"new\"]\nproto = \"icmp\"\n",
            "icmp_type = [\"echo-request\"]\naction = \"accept\"\n",
            "\n[[rule]]\nname = \"ping6\"\nstate = [\"new\"]\nproto = \"icmpv6\"\n",
            "icmp_type = [\"echo-request\"]\naction = \"accept\"\n"
        )
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pieces_make_the_policy_they_name() {
        let text = concat!(
            drop_inbound!(),
            accept_return_traffic!("return-traffic"),
            drop_invalid!("invalid"),
            accept_untracked!("nd"),
            accept_new_tcp!("web", 8080),
            accept_pings!()
        );
        let value: toml::Value = toml::from_str(text).expect("the pieces are TOML");
        assert_eq!(value["policy"]["inbound"].as_str(), Some("drop"));
        let rules = value["rule"].as_array().expect("rules");
        let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(
            names,
            ["return-traffic", "invalid", "nd", "web", "ping", "ping6"]
        );
        assert_eq!(rules[3]["dport"][0].as_integer(), Some(8080));
        assert_eq!(rules[5]["proto"].as_str(), Some("icmpv6"));
    }
}
