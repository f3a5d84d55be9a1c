//! The Store conformance suite must fail against a backend that fails. A wrapper over
//! the SQLite store that errors on every read after a reset (the calls whose answer the
//! suite expects to be empty) passed the old suite, which turned errors into empty lists.

use ciyuan_core::jiff::Timestamp;
use ciyuan_core::{AccessSet, AccountPath, BudgetSet, Entry, Incident, Usage};
use ciyuan_store::{
    Account, HourFilter, HourRow, KeyRecord, Recorded, SessionRecord, Store, StoreError,
    conformance,
};
use ciyuan_store_sqlite::SqliteStore;
use std::sync::atomic::{AtomicBool, Ordering};

/// Delegates to SQLite, but once reset its listing reads fail.
struct BrokenAfterReset {
    inner: SqliteStore,
    reset: AtomicBool,
}

impl BrokenAfterReset {
    fn broken(&self) -> Result<(), StoreError> {
        if self.reset.load(Ordering::Relaxed) {
            return Err(StoreError::Backend(
                "deliberately broken after a reset".into(),
            ));
        }
        Ok(())
    }
}

impl Store for BrokenAfterReset {
    fn projected_through(&self) -> Result<u64, StoreError> {
        self.inner.projected_through()
    }
    fn apply(&self, start: u64, entries: &[Entry]) -> Result<(), StoreError> {
        self.inner.apply(start, entries)
    }
    fn reset_projections(&self) -> Result<(), StoreError> {
        self.inner.reset_projections()?;
        self.reset.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn account(&self, path: &AccountPath) -> Result<Option<Account>, StoreError> {
        self.inner.account(path)
    }
    fn accounts_page(
        &self,
        under: &AccountPath,
        after: Option<&AccountPath>,
        limit: usize,
    ) -> Result<Vec<Account>, StoreError> {
        self.broken()?;
        self.inner.accounts_page(under, after, limit)
    }
    fn insert_key(&self, key: &KeyRecord, secret_hash: &[u8; 32]) -> Result<(), StoreError> {
        self.inner.insert_key(key, secret_hash)
    }
    fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key_by_hash(secret_hash)
    }
    fn insert_session(
        &self,
        id_hash: &[u8; 32],
        session: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.inner.insert_session(id_hash, session)
    }
    fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(id_hash)
    }
    fn revoke_session(&self, id_hash: &[u8; 32], at: i64) -> Result<bool, StoreError> {
        self.inner.revoke_session(id_hash, at)
    }
    fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        self.inner.purge_sessions(before)
    }
    fn key(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key(key_id)
    }
    fn keys_page(
        &self,
        under: &AccountPath,
        after: Option<(&AccountPath, &str)>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.keys_page(under, after, limit)
    }
    fn key_count(&self) -> Result<u64, StoreError> {
        self.inner.key_count()
    }
    fn revoke_key(&self, key_id: &str, at: Timestamp) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.revoke_key(key_id, at)
    }
    fn ingest_index(&self, f: &mut dyn FnMut(u64, u64)) -> Result<u64, StoreError> {
        self.inner.ingest_index(f)
    }
    fn budgets(&self) -> Result<Vec<(AccountPath, BudgetSet)>, StoreError> {
        self.broken()?;
        self.inner.budgets()
    }
    fn access_rules(&self) -> Result<Vec<(AccountPath, AccessSet)>, StoreError> {
        self.inner.access_rules()
    }
    fn definitions(&self) -> Result<Vec<(u64, ciyuan_core::TokenDefinition)>, StoreError> {
        self.inner.definitions()
    }
    fn price_books(&self) -> Result<Vec<(u64, ciyuan_core::PriceBook)>, StoreError> {
        self.inner.price_books()
    }
    fn contracts(&self) -> Result<Vec<(AccountPath, u64, ciyuan_core::PriceContract)>, StoreError> {
        self.inner.contracts()
    }
    fn wallet_settings(&self) -> Result<Vec<(AccountPath, ciyuan_core::WalletSet)>, StoreError> {
        self.inner.wallet_settings()
    }
    fn postings(
        &self,
        node: Option<&AccountPath>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ciyuan_store::Recorded<ciyuan_core::Posting>>, StoreError> {
        self.inner.postings(node, after, limit)
    }
    fn statements(
        &self,
        node: &AccountPath,
    ) -> Result<Vec<ciyuan_store::Recorded<ciyuan_core::StatementClosed>>, StoreError> {
        self.inner.statements(node)
    }
    fn cost_lines_page(
        &self,
        filter: &ciyuan_store::HourFilter,
        after: Option<&ciyuan_store::LineRow>,
        limit: usize,
    ) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
        self.inner.cost_lines_page(filter, after, limit)
    }
    fn cost_lines(
        &self,
        filter: &ciyuan_store::HourFilter,
    ) -> Result<Vec<ciyuan_store::LineRow>, StoreError> {
        self.inner.cost_lines(filter)
    }
    fn tier_units(&self) -> Result<Vec<ciyuan_store::TierUnits>, StoreError> {
        self.inner.tier_units()
    }
    fn service_levels(
        &self,
        under: &AccountPath,
    ) -> Result<Vec<ciyuan_store::Recorded<ciyuan_core::ServiceLevelEvaluated>>, StoreError> {
        self.inner.service_levels(under)
    }
    fn quality_range(
        &self,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        self.inner.quality_range(from_hour, to_hour)
    }
    fn cost_hours(
        &self,
        filter: &ciyuan_store::HourFilter,
    ) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        self.inner.cost_hours(filter)
    }
    fn flagged(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<Usage>>, StoreError> {
        self.inner.flagged(under, limit)
    }
    fn incidents(
        &self,
        under: &AccountPath,
        limit: usize,
    ) -> Result<Vec<Recorded<Incident>>, StoreError> {
        self.broken()?;
        self.inner.incidents(under, limit)
    }
    fn usage_hours(&self, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError> {
        self.inner.usage_hours(filter)
    }
    fn usage_tree(
        &self,
        filter: &ciyuan_store::tree::TreeFilter,
    ) -> Result<Vec<HourRow>, StoreError> {
        self.inner.usage_tree(filter)
    }
    fn cost_tree(
        &self,
        filter: &ciyuan_store::tree::TreeFilter,
    ) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        self.inner.cost_tree(filter)
    }
    fn response(&self, id: &str) -> Result<Option<Recorded<String>>, StoreError> {
        self.broken()?;
        self.inner.response(id)
    }
    fn report_progress(&self) -> Result<Vec<Recorded<ciyuan_core::ReportDelivered>>, StoreError> {
        self.broken()?;
        self.inner.report_progress()
    }
    fn keyed_usage_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<ciyuan_store::HourRow>, StoreError> {
        self.inner.keyed_usage_hours(which, filter, whole)
    }
    fn keyed_cost_hours(
        &self,
        which: ciyuan_store::keyed::Keyed,
        filter: &HourFilter,
        whole: bool,
    ) -> Result<Vec<ciyuan_store::CostRow>, StoreError> {
        self.inner.keyed_cost_hours(which, filter, whole)
    }
}

#[test]
fn regression_conformance_fails_when_reads_after_reset_error() {
    let outcome = std::panic::catch_unwind(|| {
        conformance::run_all(&|| {
            Box::new(BrokenAfterReset {
                inner: SqliteStore::open_in_memory().unwrap(),
                reset: AtomicBool::new(false),
            })
        })
    });
    let Err(panic) = outcome else {
        panic!("the suite passed against a store whose reads fail after a reset");
    };
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("after a reset failed") && message.contains("deliberately broken"),
        "the failure names the call and the error: {message}"
    );
}
