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

#[test]
fn key_writes_are_synced_and_projections_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("k.db")).unwrap();
    let synchronous = |s: &SqliteStore| -> i64 {
        s.conn()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    };
    // 1 = NORMAL, 2 = FULL.
    assert_eq!(
        synchronous(&store),
        1,
        "projector commits do not sync the WAL"
    );
    let seen = store
        .durably(|conn| conn.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)))
        .unwrap();
    assert_eq!(
        seen, 2,
        "writes the ledger cannot restore commit with a sync"
    );
    assert_eq!(
        synchronous(&store),
        1,
        "and the connection goes back to NORMAL"
    );
    // A failed write restores the setting too.
    assert!(
        store
            .durably(|conn| conn.execute("INSERT INTO no_such_table VALUES (1)", []))
            .is_err()
    );
    assert_eq!(synchronous(&store), 1);
}

#[test]
fn rollups_add_decimals_exactly_in_sql() {
    let s = SqliteStore::open_in_memory().unwrap();
    let add = |a: &str, b: &str| -> Result<String, rusqlite::Error> {
        s.conn()
            .query_row("SELECT dec_add(?, ?)", [a, b], |r| r.get(0))
    };
    assert_eq!(add("0.1", "0.2").unwrap(), "0.3");
    assert_eq!(add("-0.0000025", "0.0000025").unwrap(), "0");
    assert_eq!(
        add("0.0000000000000000000000000001", "1").unwrap(),
        "1.0000000000000000000000000001"
    );
    let e = add("79228162514264337593543950335", "1").unwrap_err();
    assert!(e.to_string().contains("needs more than 28 digits"), "{e}");
    assert!(add("x", "1").is_err());
}
