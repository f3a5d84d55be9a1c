//! ciyuan-core
