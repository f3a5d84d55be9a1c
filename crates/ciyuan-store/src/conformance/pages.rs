//! Lists that can grow without end, read a page at a time by cursor: the nodes of a
//! subtree ([`Store::accounts_page`]) and its keys ([`Store::keys_page`]).

use super::{created, ok, path, ts};
use crate::{KeyRecord, Store};
use ciyuan_core::{AccountPath, Scopes};

/// Paths that sort one way by bytes and another by a language's collation (`-`, `.`
/// and `_` ignored or moved, case folded), with siblings sharing the prefix `acme`.
const PATHS: [&str; 12] = [
    "zz", "acme/ab", "acme/a_b", "acme", "acme/aB", "acme/a/b", "acme/a.b", "acme-x", "acme/a-b",
    "acme0", "acme.x", "acme/a",
];

/// Key ids that sort one way by bytes and another by a language's collation.
const KEY_IDS: [&str; 8] = ["kb", "k_1", "K2", "k.1", "k-1", "k1", "ka", "k/1"];

/// Every node of `under`, read `limit` at a time; checks each page's size on the way.
#[track_caller]
pub(crate) fn all_accounts(s: &dyn Store, under: &AccountPath, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<AccountPath> = None;
    loop {
        let page = ok(
            s.accounts_page(under, after.as_ref(), limit),
            &format!("accounts_page({under}, {after:?}, {limit})"),
        );
        assert!(page.len() <= limit, "a page of {} > {limit}", page.len());
        let Some(last) = page.last() else {
            return out;
        };
        after = Some(last.path.clone());
        out.extend(page.iter().map(|a| a.path.to_string()));
        if page.len() < limit {
            return out;
        }
    }
}

/// Every key of `under`, read `limit` at a time: (node, id) in order.
#[track_caller]
pub(crate) fn all_keys(s: &dyn Store, under: &AccountPath, limit: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut after: Option<(AccountPath, String)> = None;
    loop {
        let page = ok(
            s.keys_page(under, after.as_ref().map(|(p, id)| (p, id.as_str())), limit),
            &format!("keys_page({under}, {after:?}, {limit})"),
        );
        assert!(page.len() <= limit, "a page of {} > {limit}", page.len());
        let Some(last) = page.last() else {
            return out;
        };
        after = Some((last.account.clone(), last.key_id.clone()));
        let short = page.len() < limit;
        out.extend(page.into_iter().map(|k| (k.account.to_string(), k.key_id)));
        if short {
            return out;
        }
    }
}

/// Applies `entries` at the store's watermark.
#[track_caller]
fn apply_next(s: &dyn Store, entries: &[ciyuan_core::Entry]) {
    let at = ok(s.projected_through(), "projected_through");
    ok(s.apply(at, entries), "apply");
}

/// `names` within `under`, in byte order (Rust's order of strings).
fn sorted_within(names: &[&str], under: &str) -> Vec<String> {
    let under = path(under);
    let mut v: Vec<String> = names
        .iter()
        .filter(|n| path(n).is_within(&under))
        .map(|n| n.to_string())
        .collect();
    v.sort();
    v
}

/// Pages of every size cover a subtree once, in byte order of the path; a cursor is a
/// position (a path that is no node, or outside the subtree, still reads from there);
/// nodes created between pages are read when they sort after the cursor and never
/// twice.
pub(crate) fn accounts_page_by_cursor(s: &dyn Store) {
    let entries: Vec<_> = PATHS.iter().map(|p| created(p)).collect();
    apply_next(s, &entries);
    for under in ["acme", "acme/a", "/"] {
        let want = sorted_within(&PATHS, under);
        for limit in 1..=want.len() + 1 {
            assert_eq!(
                all_accounts(s, &path(under), limit),
                want,
                "{under} by {limit}"
            );
        }
    }
    assert!(ok(s.accounts_page(&path("acme"), None, 0), "a page of 0").is_empty());
    let from = |after: &str| -> Vec<String> {
        ok(
            s.accounts_page(&path("acme"), Some(&path(after)), 100),
            &format!("accounts_page(acme, {after})"),
        )
        .iter()
        .map(|a| a.path.to_string())
        .collect()
    };
    // Between acme/a/b and acme/aB, and no node.
    assert_eq!(from("acme/a0"), ["acme/aB", "acme/a_b", "acme/ab"]);
    assert_eq!(from("a"), sorted_within(&PATHS, "acme"));
    assert!(from("acme/ab").is_empty());
    assert!(from("zzz").is_empty());

    // Nodes created while a listing is under way.
    let first = ok(s.accounts_page(&path("acme"), None, 3), "first page");
    let cursor = first.last().map(|a| a.path.clone());
    assert_eq!(cursor.as_ref().map(|c| c.as_str()), Some("acme/a-b"));
    apply_next(
        s,
        &[
            created("acme/a-a"),
            created("acme/A"),
            created("acme/zz"),
            created("acme/a-c"),
            created("acme1"),
        ],
    );
    let mut seen: Vec<String> = first.iter().map(|a| a.path.to_string()).collect();
    let mut after = cursor;
    loop {
        let page = ok(s.accounts_page(&path("acme"), after.as_ref(), 3), "page");
        let Some(last) = page.last() else { break };
        after = Some(last.path.clone());
        seen.extend(page.iter().map(|a| a.path.to_string()));
    }
    let mut want = sorted_within(&PATHS, "acme");
    want.extend(["acme/a-c".to_string(), "acme/zz".to_string()]);
    want.sort();
    assert_eq!(
        seen, want,
        "created before the cursor are not read, after are"
    );
}

/// Keys a page at a time: every key of a subtree once, in byte order of its node's
/// path then of its id, keys created between pages read when they sort after the
/// cursor; a revoked key is still listed.
pub(crate) fn keys_page_by_cursor(s: &dyn Store) {
    let key = |id: &str, account: &str| KeyRecord {
        key_id: id.into(),
        account: path(account),
        scopes: ok(Scopes::parse_list("read"), "Scopes::parse_list"),
        name: None,
        created_at: ts("2026-01-01T00:00:00Z"),
        revoked_at: None,
    };
    // Nodes (the root among them) whose byte order differs from a collation's, and
    // ids likewise, several on a node.
    let nodes = [
        "acme/cn",
        "acme",
        "acme-x",
        "/",
        "acme/cn/hr",
        "acme/C",
        "acme.x",
    ];
    let mut hash = 0u8;
    let mut made: Vec<(String, String)> = Vec::new();
    let mut insert = |id: &str, account: &str, made: &mut Vec<(String, String)>| {
        hash += 1;
        ok(s.insert_key(&key(id, account), &[hash; 32]), "insert_key");
        made.push((path(account).to_string(), id.to_string()));
    };
    for (i, id) in KEY_IDS.iter().enumerate() {
        insert(id, nodes[i % nodes.len()], &mut made);
        insert(&format!("{id}x"), nodes[(i + 3) % nodes.len()], &mut made);
    }
    let within = |made: &[(String, String)], under: &str| -> Vec<(String, String)> {
        let under = path(under);
        let mut v: Vec<(String, String)> = made
            .iter()
            .filter(|(node, _)| path(if node.is_empty() { "/" } else { node }).is_within(&under))
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            let node = |n: &String| if n == "/" { String::new() } else { n.clone() };
            (node(&a.0), &a.1).cmp(&(node(&b.0), &b.1))
        });
        v
    };
    ok(
        s.revoke_key("k.1", ts("2026-02-01T00:00:00Z")),
        "revoke_key",
    );
    for under in ["acme", "acme/cn", "/"] {
        let want = within(&made, under);
        assert!(want.len() > 2, "{under} has keys");
        for limit in 1..=want.len() + 1 {
            assert_eq!(all_keys(s, &path(under), limit), want, "{under} by {limit}");
        }
    }
    assert!(ok(s.keys_page(&path("acme"), None, 0), "a page of 0").is_empty());
    assert!(
        ok(s.keys_page(&path("nobody"), None, 10), "keys of no node").is_empty(),
        "a subtree with no node has no keys"
    );
    // A cursor is a position: on no key, or a node outside the subtree.
    let from = |node: &str, id: &str| -> Vec<String> {
        ok(
            s.keys_page(&path("acme"), Some((&path(node), id)), 100),
            &format!("keys_page(acme, {node} {id})"),
        )
        .into_iter()
        .map(|k| format!("{} {}", k.account, k.key_id))
        .collect()
    };
    let listed = |want: Vec<(String, String)>| -> Vec<String> {
        want.into_iter()
            .map(|(n, id)| format!("{n} {id}"))
            .collect()
    };
    let all = within(&made, "acme");
    assert_eq!(from("a", "zz"), listed(all.clone()));
    assert_eq!(
        from("acme", "k0"),
        listed(
            all.iter()
                .filter(|(n, id)| n != "acme" || id.as_str() > "k0")
                .cloned()
                .collect()
        )
    );
    assert_eq!(
        from("acme-x", "k0"),
        listed(all.iter().filter(|(n, _)| n != "acme").cloned().collect())
    );
    assert!(from("zz", "").is_empty());

    // Keys created while a listing is under way: read when after the cursor.
    let first = ok(s.keys_page(&AccountPath::root(), None, 5), "first page");
    let Some(last) = first.last() else {
        unreachable!("five keys were made")
    };
    let cursor = (last.account.clone(), last.key_id.clone());
    let mut seen: Vec<(String, String)> = first
        .iter()
        .map(|k| (k.account.to_string(), k.key_id.clone()))
        .collect();
    let mut late = Vec::new();
    assert_eq!((cursor.0.as_str(), cursor.1.as_str()), ("acme", "k_1"));
    insert("a0", "/", &mut late);
    insert("a1", "acme", &mut late);
    insert("zz0", "acme", &mut late);
    insert("zz1", "acme/cn/hr", &mut late);
    insert("a2", "acme/a", &mut late);
    let mut after = Some(cursor);
    while let Some((node, id)) = after.take() {
        let page = ok(
            s.keys_page(&AccountPath::root(), Some((&node, &id)), 5),
            "page",
        );
        if let Some(k) = page.last() {
            after = Some((k.account.clone(), k.key_id.clone()));
        }
        seen.extend(page.into_iter().map(|k| (k.account.to_string(), k.key_id)));
    }
    let before = seen.len();
    let mut want = within(&made, "/");
    for k in &late {
        if !want.contains(k) {
            want.push(k.clone());
        }
    }
    let want = within(&want, "/");
    let missing: Vec<&(String, String)> = want.iter().filter(|k| !seen.contains(k)).collect();
    assert_eq!(
        missing,
        [
            &("/".to_string(), "a0".to_string()),
            &("acme".to_string(), "a1".to_string())
        ],
        "only the keys created before the cursor are not read"
    );
    assert_eq!(before, want.len() - 2, "each key once");
}
