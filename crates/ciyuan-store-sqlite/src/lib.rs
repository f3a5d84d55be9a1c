//! ciyuan-store-sqlite
