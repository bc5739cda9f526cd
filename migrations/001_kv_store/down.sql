-- Reverts 001_kv_store: drops the key-value table.
DROP TABLE kv_entries;
