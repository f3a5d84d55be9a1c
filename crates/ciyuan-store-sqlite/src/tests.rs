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

proptest::proptest! {
    /// The fast reading of stored amounts gives what the general parser and
    /// `normalize` give, digit for digit and scale for scale, or the same refusal.
    #[test]
    fn stored_amounts_read_as_the_general_parser_reads_them(
        sign in proptest::sample::select(vec!["", "-", "+"]),
        int in "[0-9]{0,30}",
        point in proptest::bool::ANY,
        frac in "[0-9]{0,30}",
        junk in proptest::option::of("[ .eE_a-]"),
    ) {
        let mut text = format!("{sign}{int}");
        if point {
            text.push('.');
            text.push_str(&frac);
        }
        if let Some(j) = junk {
            text.push_str(&j);
        }
        let fast = stored_decimal(text.as_bytes());
        let general = rust_decimal::Decimal::from_str_exact(&text).map(|d| d.normalize());
        match (fast, general) {
            (Ok(a), Ok(b)) => {
                proptest::prop_assert_eq!(a.to_string(), b.to_string(), "{}", text);
                proptest::prop_assert_eq!(a.scale(), b.scale(), "{}", text);
                proptest::prop_assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{}", text);
            }
            (Err(_), Err(_)) => {}
            (a, b) => proptest::prop_assert!(false, "{text:?}: fast {a:?}, general {b:?}"),
        }
    }
}

#[test]
fn stored_amounts_of_the_projection_read_back() {
    for (text, want) in [
        ("0", "0"),
        ("-0", "0"),
        ("0.000", "0"),
        ("-0.0012", "-0.0012"),
        ("1.50", "1.5"),
        ("100", "100"),
        ("123456789012345678", "123456789012345678"),
        (
            "1234567890123456789012345678",
            "1234567890123456789012345678",
        ),
        (
            "0.0000000000000000000000000001",
            "0.0000000000000000000000000001",
        ),
    ] {
        let d = stored_decimal(text.as_bytes()).unwrap();
        assert_eq!(d.to_string(), want, "{text}");
    }
    for bad in ["", "-", ".", "1.", ".5", "1e3", "abc", "1.2.3"] {
        let general = rust_decimal::Decimal::from_str_exact(bad);
        assert_eq!(
            stored_decimal(bad.as_bytes()).is_ok(),
            general.is_ok(),
            "{bad:?}: {general:?}"
        );
    }
}

/// A migration that adds a projection rebuilds them all from the log: opened at the
/// schema before the subject rollups, a database's projections are cleared in the
/// migration and projected again from entry 0 (else usage recorded before it would
/// be missing from the new rollup).
#[test]
fn a_migration_marked_rebuild_clears_every_projection() {
    use ciyuan_core::{AccountInfo, Entry, EntryBody};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let store = SqliteStore::open(&path).unwrap();
    let at: ciyuan_core::jiff::Timestamp = "2026-11-24T15:00:00Z".parse().unwrap();
    let node = ciyuan_core::AccountPath::parse("acme").unwrap();
    store
        .apply(
            0,
            &[Entry::new(
                at,
                node.clone(),
                EntryBody::AccountCreated(AccountInfo::default()),
            )],
        )
        .unwrap();
    assert_eq!(store.projected_through().unwrap(), 1);
    // Back to schema 15, as a database written by the build before.
    let at_16 = MIGRATIONS
        .iter()
        .position(|m| m.contains("usage_subject_hourly"))
        .unwrap();
    store
        .conn()
        .execute_batch(&format!(
            "DROP TABLE usage_subject_hourly; DROP TABLE cost_subject_hourly;
             DROP TABLE responses; PRAGMA user_version = {at_16};"
        ))
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SqliteStore::SCHEMA_VERSION);
    assert_eq!(
        store.projected_through().unwrap(),
        0,
        "to be projected again"
    );
    assert!(
        store.account(&node).unwrap().is_none(),
        "projections cleared"
    );
}

/// Seeds `lines` billing lines the way `ciyuan bench finance` makes them (a node's
/// hours, five models, two token keys and a rounding line each) straight into a file
/// database, for the read benchmarks below.
fn seeded(path: &std::path::Path, nodes: u32, hours: u32) -> SqliteStore {
    let store = SqliteStore::open(path).unwrap();
    let models = [
        ("qwen-max", "0.0000024", "0.0000096", "0.0024", "0.0096"),
        ("qwen-plus", "0.0000008", "0.000002", "0.0008", "0.002"),
        ("glm-4", "0.000005", "0.000005", "0.005", "0.005"),
        ("deepseek-chat", "0.000002", "0.000008", "0.002", "0.008"),
        ("kimi-k2", "0.000004", "0.000016", "0.004", "0.016"),
    ];
    let d = |t: &str| ciyuan_core::ExactSum::of(rust_decimal::Decimal::from_str_exact(t).unwrap());
    let line = |key: &str, price: &str, sums: [&str; 4]| crate::cells::OwnedLine {
        adjustment: key == "rounding",
        key: key.into(),
        price: price.into(),
        currency: "CNY".into(),
        book: "list".into(),
        version: 1,
        sums: sums.map(d),
    };
    let mut conn = store.conn();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO cost_cells VALUES (?, ?, 'llm.usage', ?, ?)")
            .unwrap();
        for n in 0..nodes {
            let node = format!("bench/n{n:04}");
            for h in 0..hours {
                let hour = 1793491200 + 3600 * i64::from(h);
                for (model, p_in, p_out, l_in, l_out) in models {
                    let cell = crate::cells::merge(
                        None,
                        vec![
                            line("text.input", p_in, ["1000", l_in, l_in, l_in]),
                            line("text.output", p_out, ["1000", l_out, l_out, l_out]),
                            line("rounding", "", ["0", "0", "0", "-0.0012"]),
                        ],
                    )
                    .unwrap();
                    insert
                        .execute(rusqlite::params![node, hour, model, cell])
                        .unwrap();
                }
            }
        }
    }
    tx.commit().unwrap();
    drop(conn);
    store
}

/// CPU seconds of this thread.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Reading a million billing lines a page at a time, collected (`cost_lines_page`, its
/// sums then made decimals as the export did) and visited in place (`each_cost_line`):
/// CPU per line (`cargo test --release -p ciyuan-store-sqlite --lib -- read_throughput
/// --ignored --nocapture`).
#[test]
#[ignore]
fn read_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let store = seeded(&dir.path().join("lines.db"), 200, 334);
    let filter = HourFilter {
        account: AccountPath::parse("bench").unwrap(),
        from_hour: None,
        to_hour: None,
    };
    const PAGE: usize = 4096;
    for round in 0..3 {
        let (t, c) = (std::time::Instant::now(), thread_cpu());
        let mut after: Option<ciyuan_store::LineRow> = None;
        let (mut n, mut sum) = (0usize, rust_decimal::Decimal::ZERO);
        loop {
            let page = store
                .cost_lines_page(&filter, after.as_ref(), PAGE)
                .unwrap();
            let full = page.len() == PAGE;
            after = page.last().cloned();
            for r in page {
                n += 1;
                sum += ciyuan_store::line_decimal(r.billed, "billed").unwrap();
                std::hint::black_box(ciyuan_store::line_decimal(r.list, "list").unwrap());
                std::hint::black_box(r);
            }
            if !full {
                break;
            }
        }
        let (paged_cpu, paged_wall) = (thread_cpu() - c, t.elapsed().as_secs_f64());
        let (t, c) = (std::time::Instant::now(), thread_cpu());
        let mut after: Option<ciyuan_store::LineRow> = None;
        let (mut m, mut sum2) = (0usize, rust_decimal::Decimal::ZERO);
        loop {
            let done = store
                .each_cost_line(&filter, after.as_ref(), PAGE, &mut |l| {
                    m += 1;
                    sum2 += l.billed;
                    std::hint::black_box(l);
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap();
            if done.count < PAGE {
                break;
            }
            after = done.last;
        }
        let (each_cpu, each_wall) = (thread_cpu() - c, t.elapsed().as_secs_f64());
        assert_eq!((n, sum), (m, sum2));
        println!(
            "round {round}: {n} lines; cost_lines_page {:.0} ns a line ({paged_wall:.2} s wall), \
             each_cost_line {:.0} ns a line ({each_wall:.2} s wall)",
            paged_cpu / n as f64 * 1e9,
            each_cpu / n as f64 * 1e9
        );
    }
}

/// Paged a line at a time, a subtree's lines are its own and all of them, whether the
/// cursor is on the node itself or among its descendants, next to nodes whose paths
/// sort between them (`a-x`, `a.b`, `a0`, `ab`), and whether a page ends inside a cell
/// (an hour of a node holds several lines) or at its end.
#[test]
fn pages_of_a_subtree_hold_its_lines_only() {
    let store = SqliteStore::open_in_memory().unwrap();
    let line = |key: &str| crate::cells::OwnedLine {
        adjustment: key == "rounding",
        key: key.into(),
        price: "1".into(),
        currency: "CNY".into(),
        book: "list".into(),
        version: 1,
        sums: [ciyuan_core::ExactSum::of(rust_decimal::Decimal::ONE); 4],
    };
    let cell = |node: &str, hour: i64, keys: &[&str]| {
        let blob = crate::cells::merge(None, keys.iter().map(|k| line(k)).collect()).unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO cost_cells VALUES (?, ?, 's', 'm', ?)",
                rusqlite::params![node, hour, blob],
            )
            .unwrap();
    };
    for node in ["a", "a-x", "a.b", "a/b", "a/b/c", "a/c", "a0", "ab", "b"] {
        cell(node, 3600, &["text.input", "text.output"]);
    }
    cell(
        "a/b",
        7200,
        &["audio.input", "rounding", "text.input", "text.output"],
    );
    let filter = HourFilter {
        account: AccountPath::parse("a").unwrap(),
        from_hour: None,
        to_hour: None,
    };
    let want: Vec<String> = [
        ("a", 3600, "text.input"),
        ("a", 3600, "text.output"),
        ("a/b", 3600, "text.input"),
        ("a/b", 3600, "text.output"),
        ("a/b", 7200, "audio.input"),
        ("a/b", 7200, "text.input"),
        ("a/b", 7200, "text.output"),
        ("a/b", 7200, "rounding"),
        ("a/b/c", 3600, "text.input"),
        ("a/b/c", 3600, "text.output"),
        ("a/c", 3600, "text.input"),
        ("a/c", 3600, "text.output"),
    ]
    .map(|(a, h, k)| format!("{a} {h} {k}"))
    .into();
    for limit in [1, 2, 3, 10] {
        let (mut seen, mut after) = (Vec::new(), None::<ciyuan_store::LineRow>);
        let mut paged = Vec::new();
        loop {
            let done = store
                .each_cost_line(&filter, after.as_ref(), limit, &mut |l| {
                    seen.push(format!("{} {} {}", l.account, l.hour, l.key));
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap();
            let page = store
                .cost_lines_page(&filter, after.as_ref(), limit)
                .unwrap();
            assert_eq!(page.len(), done.count, "limit {limit}");
            paged.extend(
                page.iter()
                    .map(|l| format!("{} {} {}", l.account, l.hour, l.key)),
            );
            if done.count < limit {
                break;
            }
            assert_eq!(done.last.as_ref(), page.last(), "limit {limit}");
            after = done.last;
        }
        assert_eq!(seen, want, "limit {limit}");
        assert_eq!(paged, want, "limit {limit}");
    }
}

#[test]
fn ingest_blocks_read_back_in_entry_order_and_damage_is_an_error() {
    let pack = |pairs: &[(u64, u64)]| -> Vec<u8> {
        pairs
            .iter()
            .flat_map(|(e, h)| e.to_le_bytes().into_iter().chain(h.to_le_bytes()))
            .collect()
    };
    let read = |first: u64, bytes: &[u8], after: Option<u64>| {
        let mut got = Vec::new();
        read_ingest_block(first, bytes, after, &mut |h, e| got.push((e, h))).map(|last| (last, got))
    };
    let pairs = [(7, 70), (9, 90), (12, u64::MAX)];
    assert_eq!(
        read(7, &pack(&pairs), Some(3)).unwrap(),
        (12, pairs.to_vec())
    );
    // Keyed by another entry than its first pair's, not after the block before it,
    // out of order, cut, or empty.
    assert!(read(8, &pack(&pairs), None).is_err());
    assert!(read(7, &pack(&pairs), Some(7)).is_err());
    assert!(read(7, &pack(&[(7, 1), (7, 2)]), None).is_err());
    assert!(read(7, &pack(&[(7, 1), (6, 2)]), None).is_err());
    assert!(read(7, &pack(&pairs)[..40], None).is_err());
    assert!(read(7, &[], None).is_err());

    // Written by the projector, one block per batch, and read back whole.
    let store = SqliteStore::open_in_memory().unwrap();
    let conn = store.conn();
    insert_ingest_index(&conn, &[(1, 11), (4, 44)]).unwrap();
    insert_ingest_index(&conn, &[]).unwrap();
    insert_ingest_index(&conn, &[(5, 55)]).unwrap();
    drop(conn);
    let mut got = Vec::new();
    store.ingest_index(&mut |h, e| got.push((e, h))).unwrap();
    assert_eq!(got, [(1, 11), (4, 44), (5, 55)]);
    // A damaged block stops the read instead of losing its events.
    store
        .conn()
        .execute("UPDATE ingest_blocks SET pairs = x'00' WHERE first = 5", [])
        .unwrap();
    let err = store.ingest_index(&mut |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("block at entry 5 is damaged"),
        "{err}"
    );
}

/// `cargo test -p ciyuan-store-sqlite --release --lib -- --ignored --nocapture bench_tag_month`:
/// see [`ciyuan_store::conformance::bench_tag_month`].
#[test]
#[ignore]
fn bench_tag_month() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tags.db")).unwrap();
    ciyuan_store::conformance::bench_tag_month(&store);
}
