-- The real client of every backend reached through patroxy.
--
-- PostgreSQL sees patroxy's address as every client's; patroxy knows, for each session, the
-- client's address and the proxy's own address toward the server, whose port is the backend's
-- pg_stat_activity.client_port. Run on a server, with patroxy's sessions as JSON in :sessions:
--
--   psql -h <server> -v sessions="$(patroxy sessions --json)" -f patroxy-clients.sql
--   psql -h <server> -v sessions="$(patroxy ctl --json show sessions)" -f patroxy-clients.sql
--
-- (sockmap data path; on the fallback path the session log lines carry the same addresses.)
SELECT a.pid,
       s->>'client_addr' AS real_client,
       s->>'listener' AS listener,
       a.client_addr AS patroxy_addr,
       a.client_port AS patroxy_port,
       a.usename,
       a.state,
       left(a.query, 40) AS query
FROM pg_stat_activity a
JOIN json_array_elements(:'sessions'::json) s
  ON a.client_port = substring(s->>'proxy_addr' FROM ':(\d+)$')::int
 AND a.client_addr = trim(BOTH '[]' FROM regexp_replace(s->>'proxy_addr', ':\d+$', ''))::inet
WHERE a.backend_type = 'client backend'
ORDER BY a.pid;
