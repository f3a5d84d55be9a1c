//! ciyuan-store
