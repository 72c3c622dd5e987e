-- Billing schema: accounts and keys, budget leases, usage, discounts, invoices.
-- Money is integer nano-USD (bigint) except invoice totals, which are rounded cents.

CREATE TABLE organizations (
  id                   text PRIMARY KEY,
  name                 text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
  tax_rate_bps         integer NOT NULL DEFAULT 0 CHECK (tax_rate_bps BETWEEN 0 AND 10000),
  billing_day          smallint NOT NULL DEFAULT 1 CHECK (billing_day BETWEEN 1 AND 28),
  monthly_budget_nanos bigint NOT NULL DEFAULT 0 CHECK (monthly_budget_nanos >= 0),
  created_at           timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT organizations_name_key UNIQUE (name)
);

CREATE TABLE projects (
  id         text PRIMARY KEY,
  org_id     text NOT NULL REFERENCES organizations (id),
  name       text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT projects_org_name_key UNIQUE (org_id, name),
  -- Target of composite foreign keys that keep a project inside its org.
  CONSTRAINT projects_id_org_key UNIQUE (id, org_id)
);

CREATE TABLE api_keys (
  id                   text PRIMARY KEY,
  org_id               text NOT NULL REFERENCES organizations (id),
  project_id           text,
  name                 text NOT NULL DEFAULT '' CHECK (char_length(name) <= 200),
  -- SHA-256 hex of the secret; the secret itself is never stored.
  secret_sha256        text NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
  prefix               text NOT NULL CHECK (char_length(prefix) BETWEEN 1 AND 32),
  monthly_budget_nanos bigint NOT NULL DEFAULT 0 CHECK (monthly_budget_nanos >= 0),
  monthly_tokens       bigint NOT NULL DEFAULT 0 CHECK (monthly_tokens >= 0),
  requests_per_minute  integer NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
  tokens_per_minute    bigint NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
  allowed_models       text[] NOT NULL DEFAULT '{}',
  expires_at           timestamptz,
  created_at           timestamptz NOT NULL DEFAULT now(),
  revoked_at           timestamptz,
  -- The key this one replaced when it was created by a rotation.
  rotated_from         text REFERENCES api_keys (id),
  CONSTRAINT api_keys_secret_sha256_key UNIQUE (secret_sha256),
  CONSTRAINT api_keys_id_org_key UNIQUE (id, org_id),
  CONSTRAINT api_keys_project_fkey FOREIGN KEY (project_id, org_id) REFERENCES projects (id, org_id)
);

CREATE INDEX api_keys_org_idx ON api_keys (org_id, created_at);

-- A slice of a monthly budget granted to one gateway replica. While active (unreleased, unexpired) the whole
-- grant is reserved; once released only what was spent counts; an expired unreleased lease reserves nothing.
CREATE TABLE budget_leases (
  id            text PRIMARY KEY,
  scope         text NOT NULL CHECK (scope IN ('organization', 'api_key')),
  org_id        text NOT NULL REFERENCES organizations (id),
  api_key_id    text REFERENCES api_keys (id),
  holder        text NOT NULL CHECK (char_length(holder) BETWEEN 1 AND 200),
  period_start  timestamptz NOT NULL,
  granted_nanos bigint NOT NULL CHECK (granted_nanos > 0),
  spent_nanos   bigint CHECK (spent_nanos >= 0),
  created_at    timestamptz NOT NULL DEFAULT now(),
  expires_at    timestamptz NOT NULL,
  released_at   timestamptz,
  CHECK ((scope = 'api_key') = (api_key_id IS NOT NULL)),
  CHECK ((released_at IS NULL) = (spent_nanos IS NULL))
);

CREATE INDEX budget_leases_org_period_idx ON budget_leases (org_id, period_start) WHERE scope = 'organization';
CREATE INDEX budget_leases_key_period_idx ON budget_leases (api_key_id, period_start) WHERE scope = 'api_key';

-- One billed request; request_id makes every resend a no-op.
CREATE TABLE usage_records (
  request_id          text PRIMARY KEY CHECK (char_length(request_id) BETWEEN 1 AND 128),
  org_id              text NOT NULL REFERENCES organizations (id),
  project_id          text,
  api_key_id          text,
  model               text NOT NULL CHECK (char_length(model) <= 200),
  provider            text NOT NULL CHECK (char_length(provider) <= 200),
  endpoint            text NOT NULL CHECK (endpoint IN ('unspecified', 'chat_completions', 'embeddings', 'models')),
  input_tokens        bigint NOT NULL CHECK (input_tokens >= 0),
  cached_input_tokens bigint NOT NULL CHECK (cached_input_tokens BETWEEN 0 AND input_tokens),
  output_tokens       bigint NOT NULL CHECK (output_tokens >= 0),
  reasoning_tokens    bigint NOT NULL CHECK (reasoning_tokens BETWEEN 0 AND output_tokens),
  cost_nanos          bigint NOT NULL CHECK (cost_nanos >= 0),
  occurred_at         timestamptz NOT NULL,
  recorded_at         timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT usage_records_project_fkey FOREIGN KEY (project_id, org_id) REFERENCES projects (id, org_id),
  CONSTRAINT usage_records_api_key_fkey FOREIGN KEY (api_key_id, org_id) REFERENCES api_keys (id, org_id)
);

-- Per-org time ranges, and pages newest first by (occurred_at, request_id).
CREATE INDEX usage_records_org_time_idx ON usage_records (org_id, occurred_at, request_id);

-- Daily totals per org, project and key, maintained from exactly the usage rows inserted, in the same statement.
-- Days (UTC) compose into any billing period whatever the org's billing day.
CREATE TABLE usage_summaries (
  org_id              text NOT NULL REFERENCES organizations (id),
  project_id          text,
  api_key_id          text,
  day                 date NOT NULL,
  requests            bigint NOT NULL CHECK (requests > 0),
  input_tokens        bigint NOT NULL CHECK (input_tokens >= 0),
  cached_input_tokens bigint NOT NULL CHECK (cached_input_tokens >= 0),
  output_tokens       bigint NOT NULL CHECK (output_tokens >= 0),
  reasoning_tokens    bigint NOT NULL CHECK (reasoning_tokens >= 0),
  cost_nanos          bigint NOT NULL CHECK (cost_nanos >= 0),
  CONSTRAINT usage_summaries_key UNIQUE NULLS NOT DISTINCT (org_id, project_id, api_key_id, day)
);

CREATE INDEX usage_summaries_org_day_idx ON usage_summaries (org_id, day);
CREATE INDEX usage_summaries_key_day_idx ON usage_summaries (api_key_id, day) WHERE api_key_id IS NOT NULL;

CREATE TABLE discount_rules (
  id           text PRIMARY KEY,
  org_id       text NOT NULL REFERENCES organizations (id),
  name         text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
  kind         text NOT NULL CHECK (kind IN ('volume_graduated', 'volume_all_units', 'time_window', 'promotional')),
  priority     integer NOT NULL DEFAULT 0,
  stackable    boolean NOT NULL DEFAULT true,
  model        text,
  provider     text,
  discount_bps integer NOT NULL DEFAULT 0 CHECK (discount_bps BETWEEN 0 AND 10000),
  start_hour   smallint NOT NULL DEFAULT 0 CHECK (start_hour BETWEEN 0 AND 24),
  end_hour     smallint NOT NULL DEFAULT 24 CHECK (end_hour BETWEEN 0 AND 24),
  days_of_week smallint[] NOT NULL DEFAULT '{}' CHECK (days_of_week <@ '{0,1,2,3,4,5,6}'::smallint[]),
  valid_from   timestamptz,
  valid_until  timestamptz,
  cap_nanos    bigint NOT NULL DEFAULT 0 CHECK (cap_nanos >= 0),
  created_at   timestamptz NOT NULL DEFAULT now(),
  CHECK (valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from)
);

CREATE INDEX discount_rules_org_idx ON discount_rules (org_id);

CREATE TABLE discount_tiers (
  rule_id      text NOT NULL REFERENCES discount_rules (id) ON DELETE CASCADE,
  from_nanos   bigint NOT NULL CHECK (from_nanos >= 0),
  discount_bps integer NOT NULL CHECK (discount_bps BETWEEN 0 AND 10000),
  PRIMARY KEY (rule_id, from_nanos)
);

CREATE TABLE invoices (
  id             text PRIMARY KEY,
  org_id         text NOT NULL REFERENCES organizations (id),
  number         text NOT NULL,
  status         text NOT NULL CHECK (status IN ('draft', 'issued', 'paid', 'void')),
  period_start   timestamptz NOT NULL,
  period_end     timestamptz NOT NULL,
  subtotal_cents bigint NOT NULL CHECK (subtotal_cents >= 0),
  discount_cents bigint NOT NULL CHECK (discount_cents >= 0),
  tax_cents      bigint NOT NULL CHECK (tax_cents >= 0),
  total_cents    bigint NOT NULL CHECK (total_cents >= 0),
  tax_rate_bps   integer NOT NULL CHECK (tax_rate_bps BETWEEN 0 AND 10000),
  created_at     timestamptz NOT NULL DEFAULT now(),
  issued_at      timestamptz,
  CONSTRAINT invoices_org_number_key UNIQUE (org_id, number),
  CHECK (period_end > period_start)
);

-- At most one invoice per org and period that is not void.
CREATE UNIQUE INDEX invoices_org_period_live_idx ON invoices (org_id, period_start) WHERE status <> 'void';

CREATE TABLE invoice_line_items (
  invoice_id   text NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
  position     integer NOT NULL CHECK (position >= 0),
  description  text NOT NULL,
  model        text NOT NULL DEFAULT '',
  token_type   text NOT NULL CHECK (token_type IN ('input', 'cached_input', 'output', 'reasoning', 'discount')),
  quantity     bigint NOT NULL CHECK (quantity >= 0),
  -- Negative only for discounts.
  amount_nanos bigint NOT NULL CHECK ((token_type = 'discount') = (amount_nanos < 0) OR amount_nanos = 0),
  PRIMARY KEY (invoice_id, position)
);
