//! ciyuan-server
