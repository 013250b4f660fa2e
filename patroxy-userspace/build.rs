//! Builds the eBPF programs (patroxy-ebpf) for bpfel-unknown-none with the nightly toolchain and
//! embeds them in the binary, as the aya template does. `AYA_BUILD_SKIP=1` skips it; so does a
//! fuzz build.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // cargo fuzz builds with `--cfg fuzzing`: the fuzz targets never load the programs, so
    // empty objects stand in and save a fuzz build the whole eBPF build (fuzz/).
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR")?;
        for object in ["patroxy", "patroxy-xdp"] {
            std::fs::write(std::path::Path::new(&out_dir).join(object), [])?;
        }
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("patroxy-ebpf");
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let toolchain = match std::env::var("PATROXY_EBPF_TOOLCHAIN") {
        Ok(name) => Toolchain::Custom(Box::leak(name.into_boxed_str())),
        Err(_) => Toolchain::default(),
    };
    println!("cargo:rerun-if-env-changed=PATROXY_EBPF_TOOLCHAIN");
    aya_build::build_ebpf(
        [Package {
            name: "patroxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
