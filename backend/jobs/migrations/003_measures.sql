-- The bootstrap 95% interval of each score (backend/scoring/measures.py, docs/measures.md).
ALTER TABLE scores ADD COLUMN lo DOUBLE;
ALTER TABLE scores ADD COLUMN hi DOUBLE;
