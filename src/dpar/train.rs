//! Training DPAR on code shards with stored entropies (placeholder until the task lands).
