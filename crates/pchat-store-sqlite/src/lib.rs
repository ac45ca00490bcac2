//! pchat-store-sqlite (being written).
