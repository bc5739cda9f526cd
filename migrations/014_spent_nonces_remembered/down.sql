DROP TRIGGER bootstrap_tokens_renamed ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_renamed();
DROP TRIGGER bootstrap_tokens_nonce_not_spent ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_nonce_not_spent();
DROP TRIGGER bootstrap_tokens_remember_spent_on_truncate ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_before_truncate();
DROP TRIGGER bootstrap_tokens_remember_spent ON bootstrap_tokens;
DROP FUNCTION dployr_bootstrap_tokens_remember_spent();
DROP TABLE spent_nonces;
