//! Lists that can grow without end (the account tree, its keys) are read a page at a
//! time, through the API and the CLI.

use crate::common::*;
use serde_json::{Value, json};
use std::time::Instant;

/// Leaf nodes created under `big` (with their 40 parents and `big` itself).
const LEAVES: usize = 2400;
/// Teams the leaves are spread over.
const TEAMS: usize = 40;

fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    let (status, body) = server.http("GET", path, key, None);
    (status, json(&body))
}

/// Every row of a listing through the API after `after`, `limit` at a time (the
/// server's default when `None`): checks each page's size and that `next` is the last row's cursor,
/// present on every page but the last.
fn api_pages(
    server: &Server,
    key: &str,
    base: &str,
    field: &str,
    id: &str,
    limit: Option<usize>,
    mut after: Option<String>,
) -> (Vec<String>, usize) {
    let size = limit.unwrap_or(1000);
    let mut rows: Vec<String> = Vec::new();
    let mut pages = 0;
    loop {
        let mut url = base.to_string();
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        if let Some(l) = limit {
            url.push_str(&format!("&limit={l}"));
        }
        let (status, page) = get(server, key, &url);
        assert_eq!(status, 200, "{url}: {page}");
        pages += 1;
        let got: Vec<String> = page[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[id].as_str().unwrap().to_string())
            .collect();
        assert!(got.len() <= size, "{url}: {} rows", got.len());
        rows.extend(got.iter().cloned());
        match page.get("next") {
            Some(next) => {
                assert_eq!(got.len(), size, "{url}: a page short of its limit goes on");
                assert_eq!(next.as_str(), got.last().map(String::as_str), "{url}");
                after = Some(next.as_str().unwrap().to_string());
            }
            None => return (rows, pages),
        }
    }
}

#[test]
fn accounts_and_keys_are_listed_page_by_page() {
    let tmp = tempfile::tempdir().unwrap();
    listed_page_by_page(Server::start(&tmp.path().join("data")));
}

#[test]
fn accounts_and_keys_are_listed_page_by_page_on_postgres() {
    let cluster = ciyuan_store_postgres::testing::TestCluster::start()
        .expect("PostgreSQL for the tests (initdb, pg_ctl)");
    let url = cluster.database("listings").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    listed_page_by_page(Server::start_with(
        &tmp.path().join("node"),
        &["--database", &url],
    ));
}

fn listed_page_by_page(server: Server) {
    let admin = server.bootstrap.clone().unwrap();

    // Names whose byte order differs from a language's collation ('-', '.', '_',
    // case), and neighbours of `big` outside its subtree.
    let started = Instant::now();
    let leaves: Vec<String> = (0..LEAVES)
        .map(|i| {
            let sep = ["-", ".", "_", ""][i % 4];
            let case = if i % 3 == 0 { "P" } else { "p" };
            format!("big/t{:02}/{case}{sep}{i:04}", i % TEAMS)
        })
        .collect();
    std::thread::scope(|scope| {
        for chunk in leaves.chunks(LEAVES / 4) {
            let (server, admin) = (&server, &admin);
            scope.spawn(move || {
                for p in chunk {
                    let (st, body) =
                        server.http("POST", "/api/v1/accounts", admin, Some(&json!({"path": p})));
                    assert_eq!(st, 201, "{p}: {}", String::from_utf8_lossy(&body));
                }
            });
        }
    });
    for p in ["big-x", "big.x", "big0", "bigger"] {
        let (st, _) = server.http(
            "POST",
            "/api/v1/accounts",
            &admin,
            Some(&json!({"path": p})),
        );
        assert_eq!(st, 201, "{p}");
    }
    eprintln!(
        "created {} nodes in {:?}",
        LEAVES + TEAMS + 5,
        started.elapsed()
    );
    let mut want: Vec<String> = leaves.clone();
    want.push("big".into());
    want.extend((0..TEAMS).map(|t| format!("big/t{t:02}")));
    want.sort();
    assert_eq!(want.len(), LEAVES + TEAMS + 1);

    // The API: pages of the default size, of one size that does not divide the tree,
    // and of the largest size, each covering the subtree once in byte order.
    let base = "/api/v1/accounts?under=big";
    let (rows, pages) = api_pages(&server, &admin, base, "accounts", "path", None, None);
    assert_eq!(rows, want);
    assert_eq!(pages, want.len().div_ceil(1000));
    let (rows, pages) = api_pages(&server, &admin, base, "accounts", "path", Some(333), None);
    assert_eq!(rows, want);
    assert_eq!(pages, want.len().div_ceil(333));
    let (rows, pages) = api_pages(
        &server,
        &admin,
        base,
        "accounts",
        "path",
        Some(10_000),
        None,
    );
    assert_eq!((rows.len(), pages), (want.len(), 1));
    // Exactly one page's worth: the page that holds the last node says so.
    let exact = format!("{base}&limit={}", want.len());
    let (st, page) = get(&server, &admin, &exact);
    assert_eq!(st, 200);
    assert!(page.get("next").is_none(), "{}", page["next"]);

    // Nodes created between pages: those after the cursor are read, once.
    let (_, first) = get(&server, &admin, &format!("{base}&limit=500"));
    let cursor = first["next"].as_str().unwrap().to_string();
    for p in ["big/t00/zz", "big/a", "big/t20/zz", "big/t39/zz"] {
        let (st, _) = server.http(
            "POST",
            "/api/v1/accounts",
            &admin,
            Some(&json!({"path": p})),
        );
        assert_eq!(st, 201, "{p}");
    }
    let (rest, _) = api_pages(
        &server,
        &admin,
        base,
        "accounts",
        "path",
        None,
        Some(cursor),
    );
    let mut seen: Vec<String> = first["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    seen.extend(rest);
    want.extend(["big/t00/zz", "big/a", "big/t20/zz", "big/t39/zz"].map(String::from));
    want.sort();
    let skipped: Vec<&String> = want.iter().filter(|p| !seen.contains(p)).collect();
    assert_eq!(
        skipped,
        ["big/a", "big/t00/zz"],
        "only the nodes created before the cursor"
    );
    assert_eq!(seen.len(), want.len() - 2, "each node once");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in byte order");

    // Bad cursors and limits are refused, naming the parameter.
    for (query, needle) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=-1", "limit"),
        ("limit=lots", "limit"),
        ("after=a//b", "after"),
        ("after=zzz", "after: zzz is not within big"),
    ] {
        let (st, v) = get(&server, &admin, &format!("{base}&{query}"));
        assert_eq!(st, 400, "{query}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(needle),
            "{query}: {v}"
        );
    }

    // The CLI follows `next` to the end: every node, in order, as text and as JSON.
    let text = stdout(&server.cli(&admin, &["accounts", "list", "--under", "big"]));
    let listed: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(listed, want);
    let out = stdout(&server.cli(&admin, &["accounts", "list", "--under", "big", "--json"]));
    let v = json(out.as_bytes());
    let listed: Vec<&str> = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(listed, want);
    // --limit prints one page and where the next begins; --after goes on from there.
    let out = stdout(&server.cli(
        &admin,
        &["accounts", "list", "--under", "big", "--limit", "7"],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 7 + 1, "{out}");
    assert_eq!(lines[8], format!("more: --after {}", want[6]));
    let out = stdout(&server.cli(
        &admin,
        &[
            "accounts", "list", "--under", "big", "--after", &want[6], "--limit", "2", "--json",
        ],
    ));
    let v = json(out.as_bytes());
    assert_eq!(v["accounts"][0]["path"], want[7].as_str());
    assert_eq!(v["next"], want[8].as_str());
    let o = server.cli(&admin, &["accounts", "list", "--limit", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("limit"));

    // Keys: a page at a time by node then id, the same way.
    let mut made: Vec<(String, String)> = (0..30)
        .map(|i| {
            let account = format!("big/t{:02}", i % 7);
            let (st, body) = server.http(
                "POST",
                "/api/v1/keys",
                &admin,
                Some(&json!({"account": account, "scopes": ["read"]})),
            );
            assert_eq!(st, 201);
            (account, json(&body)["key_id"].as_str().unwrap().to_string())
        })
        .collect();
    made.sort();
    let ids: Vec<String> = made.into_iter().map(|(_, id)| id).collect();
    let (st, body) = server.http(
        "POST",
        "/api/v1/keys",
        &admin,
        Some(&json!({"account": "big-x", "scopes": ["read"]})),
    );
    assert_eq!(st, 201);
    let outside = json(&body)["key_id"].as_str().unwrap().to_string();
    let kbase = "/api/v1/keys?account=big";
    let (rows, pages) = api_pages(&server, &admin, kbase, "keys", "key_id", Some(7), None);
    assert_eq!(rows, ids);
    assert_eq!(pages, ids.len().div_ceil(7));
    // A cursor that is no key of the listing is refused (a key of another subtree
    // answers as one that does not exist).
    for (query, needle) in [
        ("after=ck_1".to_string(), "after"),
        ("after=ABCDEF012345".into(), "after"),
        (
            "after=0123456789ab".into(),
            "after: 0123456789ab is no key of big",
        ),
        (format!("after={outside}"), "is no key of big"),
        ("limit=20000".into(), "limit"),
    ] {
        let (st, v) = get(&server, &admin, &format!("{kbase}&{query}"));
        assert_eq!(st, 400, "{query}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(needle),
            "{query}: {v}"
        );
    }
    let out = stdout(&server.cli(&admin, &["keys", "list", "--account", "big", "--json"]));
    let listed: Vec<String> = json(out.as_bytes())["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids);
    let out = stdout(&server.cli(
        &admin,
        &["keys", "list", "--account", "big", "--limit", "5"],
    ));
    assert!(
        out.lines().nth(5).unwrap().starts_with(&ids[4])
            && out.contains(&format!("more: --after {}", ids[4])),
        "{out}"
    );
    server.stop();
}
