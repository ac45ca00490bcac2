//! pchat-server (being written).
