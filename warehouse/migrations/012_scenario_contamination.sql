-- Decontamination against the agentic scenarios: a hit names the scenario whose text a document
-- rehearses (item_id is then SCENARIO/file, item_source the file and line). NULL: an item-bank hit.
ALTER TABLE contamination ADD COLUMN scenario VARCHAR;
