//! ciyuan-tlog
