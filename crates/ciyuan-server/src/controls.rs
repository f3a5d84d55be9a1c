//! The in-memory projections the request path reads, applied from ledger entries by
//! one function ([`App::apply_controls`]): budget limits and model access rules (in the
//! budget engine) and token definitions. Handlers append a control entry and hand it
//! here; start-up builds the same state from the store's projections. No handler
//! changes the engine or the definitions by any other road, so what is enforced is
//! what the ledger says.
//!
//! Token definitions are declared in the configuration file or through
//! `POST /api/v1/definitions`; a declaration the ledger does not hold is appended as a
//! `definition.set` entry, one it holds identically is a no-op, and one that says
//! something else about an existing `service@version` is refused: a definition never
//! changes the past.

use crate::error::ApiError;
use crate::{App, auth::Caller, extract::Json};
use axum::extract::State;
use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccountPath, Entry, EntryBody, Scope, TokenDefinition};
use ciyuan_measure::DefinitionSet;
use ciyuan_store::Store;
use serde::Serialize;
use std::sync::{Arc, RwLock};

/// The token definitions in force, swapped whole when one is declared (readers take
/// an `Arc` and never wait on a writer for long).
#[derive(Default)]
pub(crate) struct Definitions(RwLock<Arc<DefinitionSet>>);

impl Definitions {
    pub(crate) fn get(&self) -> Arc<DefinitionSet> {
        // A writer only swaps an Arc: a poisoned lock still holds a whole set.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, set: DefinitionSet) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
    }

    /// The definitions the store's projection holds.
    pub(crate) fn load(store: &dyn Store) -> Result<Definitions, ApiError> {
        let d = Definitions::default();
        d.set(compiled(store)?);
        Ok(d)
    }
}

/// The store's definitions, compiled.
fn compiled(store: &dyn Store) -> Result<DefinitionSet, ApiError> {
    let defs: Vec<TokenDefinition> = store.definitions()?.into_iter().map(|(_, d)| d).collect();
    DefinitionSet::new(defs)
        .map_err(|e| ApiError::internal(format!("definitions in the ledger: {e}")))
}

/// The entries that record `declared` definitions the ledger does not hold yet
/// (declared by `by`), or why one cannot be recorded. Call with the projections
/// caught up, under the admin lock.
pub(crate) fn definition_entries(
    store: &dyn Store,
    declared: &[TokenDefinition],
    by: &AccountPath,
    now: Timestamp,
) -> Result<Vec<Entry>, String> {
    let mut known: Vec<TokenDefinition> = store
        .definitions()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let mut entries = Vec::new();
    for d in declared {
        if admit_definition(&known, d, now)? {
            let d = TokenDefinition {
                set_by: Some(by.clone()),
                ..d.clone()
            };
            known.push(d.clone());
            entries.push(Entry::new(
                now,
                AccountPath::root(),
                EntryBody::DefinitionSet(d),
            ));
        }
    }
    Ok(entries)
}

/// Whether `new` may be recorded beside the ledger's `existing` definitions at `now`:
/// `Ok(false)` when the ledger already says exactly this, `Ok(true)` when it is a new
/// version that changes nothing already measured, else why not.
pub(crate) fn admit_definition(
    existing: &[TokenDefinition],
    new: &TokenDefinition,
    now: Timestamp,
) -> Result<bool, String> {
    let id = new.id();
    let same_service: Vec<&TokenDefinition> = existing
        .iter()
        .filter(|d| d.service == new.service)
        .collect();
    if let Some(old) = same_service.iter().find(|d| d.version == new.version) {
        return if old.same_rule(new) {
            Ok(false)
        } else {
            Err(format!(
                "{id} is already in the ledger with other rules; a definition never changes the past: declare version {} instead",
                same_service
                    .iter()
                    .map(|d| d.version)
                    .max()
                    .unwrap_or(new.version)
                    + 1
            ))
        };
    }
    if let Some(latest) = same_service.iter().max_by_key(|d| d.version) {
        if new.version < latest.version {
            return Err(format!(
                "{id}: versions increase; the ledger's latest is {}",
                latest.id()
            ));
        }
        if new.effective_from <= latest.effective_from {
            return Err(format!(
                "{id}: effective_from {} must be after that of {} ({})",
                new.effective_from,
                latest.id(),
                latest.effective_from
            ));
        }
        // Events up to now may have been measured with the latest version: a new one
        // takes effect from now on, never retroactively.
        if new.effective_from < now {
            return Err(format!(
                "{id}: effective_from {} is in the past; events already measured with {} would change meaning (use a time from now on)",
                new.effective_from,
                latest.id()
            ));
        }
    }
    let mut all: Vec<TokenDefinition> = existing.to_vec();
    all.push(new.clone());
    DefinitionSet::new(all).map_err(|e| e.to_string())?;
    Ok(true)
}

impl App {
    /// The token definitions in force.
    pub(crate) fn definitions(&self) -> Arc<DefinitionSet> {
        self.definitions.get()
    }

    /// Applies appended control entries to the in-memory state the request path reads.
    /// Called after they are durable and projected (so the store agrees).
    pub(crate) fn apply_controls(&self, entries: &[Entry]) -> Result<(), ApiError> {
        let now = Timestamp::now();
        let mut definitions = false;
        let mut prices = false;
        for entry in entries {
            let node = &entry.account;
            match &entry.body {
                EntryBody::BudgetSet(b) => {
                    let tz = ciyuan_store::effective_time_zone(self.store.as_ref(), node)?;
                    let Some(spec) = crate::budgets::spec_of(node, b, tz) else {
                        tracing::error!(%node, limit = %b.name, "a money limit without its amount is not enforced");
                        continue;
                    };
                    self.budget.set_limit(spec.clone()).map_err(|e| {
                        ApiError::internal(format!("limit {} on {node}: {e}", b.name))
                    })?;
                    // A new limit, or one whose window changed, starts from the
                    // ledger's usage in its window, not from zero.
                    crate::budgets::restore_used(self.store.as_ref(), &self.budget, &spec, now)?;
                }
                EntryBody::BudgetCleared(b) => {
                    self.budget.clear_limit(node, &b.name);
                }
                EntryBody::AccessSet(a) => {
                    self.budget
                        .set_models(node, a.allow.clone(), a.deny.clone())
                }
                EntryBody::DefinitionSet(_) => definitions = true,
                EntryBody::PriceBook(_) | EntryBody::PriceContract(_) => prices = true,
                _ => {}
            }
        }
        if definitions {
            self.definitions.set(compiled(self.store.as_ref())?);
        }
        if prices {
            self.pricing.apply(entries);
        }
        Ok(())
    }
}

/// Whether an entry changes state [`App::apply_controls`] keeps.
pub(crate) fn is_control(entry: &Entry) -> bool {
    matches!(
        entry.body,
        EntryBody::BudgetSet(_)
            | EntryBody::BudgetCleared(_)
            | EntryBody::AccessSet(_)
            | EntryBody::DefinitionSet(_)
            | EntryBody::PriceBook(_)
            | EntryBody::PriceContract(_)
    )
}

/// Whether an entry changes how usage is measured or priced (see `App::rules_gate`).
pub(crate) fn is_rule(entry: &Entry) -> bool {
    matches!(
        entry.body,
        EntryBody::DefinitionSet(_) | EntryBody::PriceBook(_) | EntryBody::PriceContract(_)
    )
}

/// One definition as the API shows it.
#[derive(Serialize)]
pub struct DefinitionView {
    /// `service@version`.
    id: String,
    /// The ledger entry that declared it.
    entry: u64,
    #[serde(flatten)]
    definition: TokenDefinition,
}

/// `GET /api/v1/definitions`: every declared version, with its entry (any read key:
/// tenants must be able to see how their events are counted).
pub async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Read)?;
    app.caught_up().await?;
    let defs = app.blocking(|app| Ok(app.store.definitions()?)).await?;
    let views: Vec<DefinitionView> = defs
        .into_iter()
        .map(|(entry, definition)| DefinitionView {
            id: definition.id(),
            entry,
            definition,
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "definitions": views })))
}

/// `POST /api/v1/definitions`: declares definitions (a JSON array, or one object), for
/// root admins: the rules of counting bind every tenant. Answers the entries appended.
pub async fn declare(
    State(app): State<Arc<App>>,
    caller: Caller,
    Json(body): Json<serde_json::Value>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    caller.require(Scope::Admin)?;
    if !caller.key.account.is_root() {
        return Err(ApiError::forbidden(
            "token definitions bind every tenant: only a root admin key may declare them",
        ));
    }
    let declared: Vec<TokenDefinition> = match body {
        serde_json::Value::Array(_) => serde_json::from_value(body),
        other => serde_json::from_value(other).map(|d| vec![d]),
    }
    .map_err(|e| ApiError::bad_request(format!("definitions: {e}")))?;
    if declared.len() > MAX_DECLARED {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_DECLARED} definitions at once"
        )));
    }
    for d in &declared {
        ciyuan_core::check_text("service", &d.service, 256)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let _guard = app.admin_lock.lock().await;
    app.caught_up().await?;
    let by = caller.key.account.clone();
    let entries = app
        .blocking(move |app| {
            definition_entries(app.store.as_ref(), &declared, &by, Timestamp::now())
                .map_err(ApiError::unprocessable)
        })
        .await?;
    let range = if entries.is_empty() {
        None
    } else {
        Some(app.append_visible(&entries).await?)
    };
    Ok(axum::Json(serde_json::json!({
        "appended": entries.iter().filter_map(|e| match &e.body {
            EntryBody::DefinitionSet(d) => Some(d.id()),
            _ => None,
        }).collect::<Vec<_>>(),
        "entries": range.map(|r| (r.start..r.end).collect::<Vec<_>>()).unwrap_or_default(),
    })))
}

/// Most definitions declared in one request.
const MAX_DECLARED: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn def(version: u32, from: &str, expr: &str) -> TokenDefinition {
        TokenDefinition {
            service: "doc.verify".into(),
            version,
            effective_from: from.parse().unwrap(),
            description: None,
            tokens: [("other.input".to_string(), expr.to_string())].into(),
            set_by: None,
        }
    }

    #[test]
    fn a_definition_never_changes_the_past() {
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let v1 = def(1, "2020-01-01T00:00:00Z", "pages * 500");
        // The first version of a service may start in the past: nothing was measured.
        assert_eq!(admit_definition(&[], &v1, now), Ok(true));
        let existing = [v1.clone()];
        // The same words again: nothing to record.
        assert_eq!(admit_definition(&existing, &v1, now), Ok(false));
        // Other words for a recorded version: refused, naming the next version.
        let e = admit_definition(&existing, &def(1, "2020-01-01T00:00:00Z", "pages * 9"), now)
            .unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        // A new version taking effect before now would re-mean measured events.
        let e =
            admit_definition(&existing, &def(2, "2026-05-01T00:00:00Z", "pages"), now).unwrap_err();
        assert!(e.contains("in the past"), "{e}");
        assert_eq!(
            admit_definition(&existing, &def(2, "2026-07-01T00:00:00Z", "pages"), now),
            Ok(true)
        );
        // A rule that does not compile is refused before it is recorded.
        assert!(
            admit_definition(&existing, &def(2, "2026-07-01T00:00:00Z", "pages +"), now).is_err()
        );
    }
}
