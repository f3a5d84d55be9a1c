//! ciyuan-ledger
