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
