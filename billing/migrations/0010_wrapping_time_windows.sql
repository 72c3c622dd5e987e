-- A time window may wrap past midnight: start_hour > end_hour covers the hours >= start_hour or < end_hour (22 to 6
-- is 22:00-06:00 UTC). A window is still never empty (start_hour <> end_hour; all day is 0 to 24), and only time
-- windows wrap, since no other kind reads its hours.
ALTER TABLE discount_rules
  DROP CONSTRAINT discount_rules_hours_check,
  ADD CONSTRAINT discount_rules_hours_check CHECK (
    start_hour <> end_hour AND start_hour <= 23 AND end_hour >= 1 AND (start_hour < end_hour OR kind = 'time_window')
  );
