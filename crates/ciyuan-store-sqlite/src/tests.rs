use super::*;

#[test]
fn conformance_in_memory() {
    ciyuan_store::conformance::run_all(&|| Box::new(SqliteStore::open_in_memory().unwrap()));
}

#[test]
fn conformance_on_disk_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    ciyuan_store::conformance::run_all(&|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(SqliteStore::open(&dir.path().join(format!("{n}.db"))).unwrap())
    });
    // Reopening migrates nothing twice and keeps the data.
    let path = dir.path().join("0.db");
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.projected_through().unwrap(), 2);
}
