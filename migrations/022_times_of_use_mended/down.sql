-- The rows 022 mended are not put back: a token marked used, or a use
-- moved to its creation, stays so (the times before were impossible ones,
-- and the nonces spent). Nothing of the schema changed.
SELECT 1;
