-- Reverting leaves the forgetting by age to scan the table; the code
-- before 027 does not forget by age at all.
COMMENT ON TABLE sessions_to_end IS
    'Deleted accounts whose sessions are not yet known to be ended: DataLayer ends them, then forgets the row.';
DROP INDEX sessions_to_end_deleted_at_idx;
