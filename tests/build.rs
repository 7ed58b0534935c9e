//! Hands the path of the benchmarks' eBPF object, which session-user's build script
//! builds beside the firewall's (`DEP_SESSION_EBPF_BENCH_OBJECT`), to `src/bench_object.rs`
//! as `SESSION_BENCH_OBJECT`.

fn main() {
    const FROM: &str = "DEP_SESSION_EBPF_BENCH_OBJECT";
    println!("cargo:rerun-if-env-changed={FROM}");
    let path = std::env::var(FROM).unwrap_or_else(|_| {
        panic!("{FROM} unset: session-user's build script must build the eBPF objects first")
    });
    println!("cargo:rerun-if-changed={path}");
    println!("cargo:rustc-env=SESSION_BENCH_OBJECT={path}");
}
