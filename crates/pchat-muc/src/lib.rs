//! pchat-muc (being written).
