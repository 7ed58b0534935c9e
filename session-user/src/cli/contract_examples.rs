//! Test helpers: the JSON examples that docs/CONTRACT.md documents for users, read out of
//! the document itself so that the record types are checked against what users read.

use std::net::Ipv4Addr;

use serde_json::Value;
use session_common::wire::{FAMILY_IPV4, FlowKey, proto};

/// docs/CONTRACT.md, where the JSON formats are documented for users.
pub const CONTRACT: &str = include_str!("../../../docs/CONTRACT.md");

/// The example right under `heading` in docs/CONTRACT.md, from the first line starting
/// with `{` through the one ending the object, with the placeholders `N` made 1 and the
/// elisions `, ...` left out, so that it is JSON.
pub fn contract_text(heading: &str) -> String {
    let section = CONTRACT
        .split_once(heading)
        .unwrap_or_else(|| panic!("docs/CONTRACT.md has no heading {heading:?}"))
        .1;
    let start = section
        .find("\n{")
        .expect("an example object after the heading")
        + 1;
    let mut text = String::new();
    for line in section[start..].lines() {
        text.push_str(line);
        text.push('\n');
        if line.trim_end().ends_with('}') {
            break;
        }
    }
    text.replace(", ...", "").replace(": N", ": 1")
}

/// [`contract_text`] parsed.
pub fn contract_example(heading: &str) -> Value {
    let text = contract_text(heading);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the example under {heading:?} is not JSON ({e}):\n{text}"))
}

/// The keys of a JSON object, sorted.
pub fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// The key of the documented examples' flow: TCP 198.18.0.1:40000 -> 198.18.0.2:8080.
pub fn documented_flow() -> FlowKey {
    FlowKey {
        addr_lo: Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped().octets(),
        addr_hi: Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets(),
        port_lo: 40000,
        port_hi: 8080,
        proto: proto::TCP,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}
