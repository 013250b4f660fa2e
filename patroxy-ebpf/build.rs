use which::which;

/// Rebuild the eBPF programs when bpf-linker changes: it is not a cargo dependency, so cargo
/// would not notice a new linker otherwise (same as the aya template).
fn main() {
    let bpf_linker = which("bpf-linker").unwrap();
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
