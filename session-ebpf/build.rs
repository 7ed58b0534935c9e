//! Rebuild the eBPF object when bpf-linker changes, as aya-template does: the linker is
//! not a cargo dependency, so cargo would not notice otherwise.

use which::which;

fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
