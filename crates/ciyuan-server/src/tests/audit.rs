//! The audit API: who may sign checkpoints, and paging through them.

use super::*;

#[tokio::test]
async fn regression_only_root_audit_keys_force_a_checkpoint() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn"})))
        .await;
    let tenant_auditor = h.key("acme", &["audit"]).await;
    let root_admin_only = h.key("/", &["admin"]).await;
    let root_auditor = h.key("/", &["audit"]).await;
    let (_, cn) = h.admin("GET", "/api/v1/accounts/acme/cn", None).await;
    let id = cn["created_entry"].as_u64().unwrap();

    for key in [&tenant_auditor, &root_admin_only] {
        let (s, v) = h
            .send("POST", "/api/v1/audit/checkpoint", Some(key), None)
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    }
    let (s, v) = h
        .send(
            "POST",
            "/api/v1/audit/checkpoint",
            Some(&tenant_auditor),
            None,
        )
        .await;
    assert!(
        v["detail"].as_str().unwrap().contains("root account /"),
        "{s} {v}"
    );

    // Nor through the back door: a proof of an entry no checkpoint covers yet waits
    // for the periodic checkpoint instead of having one signed.
    let (s, v) = h
        .send(
            "GET",
            &format!("/api/v1/audit/entries/{id}/proof"),
            Some(&tenant_auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let (s, v) = h
        .send(
            "GET",
            "/api/v1/audit/checkpoints",
            Some(&root_auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["checkpoints"].as_array().unwrap().len(),
        0,
        "nothing signed"
    );

    let (s, v) = h
        .send(
            "POST",
            "/api/v1/audit/checkpoint",
            Some(&root_auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Once covered, the tenant's auditor gets its proof from that checkpoint.
    let (s, v) = h
        .send(
            "GET",
            &format!("/api/v1/audit/entries/{id}/proof"),
            Some(&tenant_auditor),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn checkpoints_are_listed_a_page_at_a_time() {
    let h = harness().await;
    let signed = 23;
    for _ in 0..signed {
        let (s, v) = h.admin("POST", "/api/v1/audit/checkpoint", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // The default page holds them all, with no next page.
    let (s, v) = h.admin("GET", "/api/v1/audit/checkpoints", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), signed);
    assert!(v["next"].is_null(), "{v}");

    // A walk in pages of 5 sees each once, in order, and ends.
    let mut cursor = 0u64;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (s, v) = h
            .admin(
                "GET",
                &format!("/api/v1/audit/checkpoints?cursor={cursor}&limit=5"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let page = v["checkpoints"].as_array().unwrap();
        assert!(page.len() <= 5);
        seen.extend(
            page.iter()
                .map(|c| c["checkpoint"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match v["next"].as_u64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (signed, 5));
    let (_, all) = h.admin("GET", "/api/v1/audit/checkpoints", None).await;
    let all: Vec<&str> = all["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["checkpoint"].as_str().unwrap())
        .collect();
    assert_eq!(seen, all);

    // At the end: an empty page; past it, or with a bad limit: 400 naming the bound.
    let (s, v) = h
        .admin("GET", "/api/v1/audit/checkpoints?cursor=23", None)
        .await;
    assert_eq!(
        (s, v["checkpoints"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
    for (query, needle) in [
        ("cursor=24", "past the end"),
        ("limit=0", "1 to 1000"),
        ("limit=1001", "1 to 1000"),
    ] {
        let (s, v) = h
            .admin("GET", &format!("/api/v1/audit/checkpoints?{query}"), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(needle),
            "{query}: {v}"
        );
    }
    let (s, _) = h
        .admin("GET", "/api/v1/audit/checkpoints?start=3", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown parameters are refused");
}
