-- Addresses stay in their new form: the old form is not kept, and every
-- new-form address also satisfies the old rule (trimmed, lower-cased).
DROP FUNCTION dployr_email_identity(TEXT);
