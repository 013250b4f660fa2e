//! The importer end to end: HAProxy text in, patroxy's validated `Config` out.
use std::path::PathBuf;

use super::*;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/haproxy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seed's haproxy.cfg converts with nothing lost into what the shipped patroxy.toml says,
/// but for the stats page's admin access: HAProxy's has no `stats admin`, so nobody may change
/// server states there ("off"), where the shipped file lets this host's users ("local").
#[test]
fn the_seed_converts_without_loss_into_the_shipped_config() {
    let import = import(&fixture("seed.cfg"), "haproxy.cfg", "patroxy.toml").unwrap();
    assert!(
        import.findings.is_empty(),
        "{:#?}\n{}",
        import.findings,
        import.toml
    );
    let imported = import
        .validation
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}\n{}", import.toml));
    assert!(import.is_clean());
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../patroxy.toml");
    let mut expected = config::load(&shipped).unwrap();
    expected.stats.as_mut().unwrap().admin = config::AdminAccess::Off;
    assert_eq!(*imported, expected);
    assert!(
        import
            .toml
            .contains("maxconn = 2000  # haproxy.cfg:2: maxconn 2000"),
        "{}",
        import.toml
    );
}
