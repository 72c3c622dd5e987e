-- Usage of OpenAI's Responses API (POST /v1/responses) is recorded under its own endpoint.
ALTER TABLE usage_records
  DROP CONSTRAINT usage_records_endpoint_check,
  ADD CONSTRAINT usage_records_endpoint_check
    CHECK (endpoint IN ('unspecified', 'chat_completions', 'embeddings', 'models', 'responses'));
