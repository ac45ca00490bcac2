//! pchat-testkit (being written).
