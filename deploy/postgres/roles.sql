-- costwatch's PostgreSQL roles, least privilege (step 1 of 2, before costwatch first starts).
-- Run as a superuser, or as the managed service's admin user (RDS: the master user; Cloud SQL:
-- `postgres`; Azure: the server admin), for example:
--
--   psql "host=db.example.com user=postgres dbname=postgres sslmode=verify-full sslrootcert=ca.pem" \
--     -v owner=costwatch -v owner_password="$OWNER_PASSWORD" \
--     -v grafana=grafana -v grafana_password="$GRAFANA_PASSWORD" \
--     -v db=costwatch -f deploy/postgres/roles.sql
--
-- costwatch logs in as `owner`: no superuser, no CREATEDB, no CREATEROLE; it owns its database
-- and so the tables its migrations create. Grafana logs in as `grafana`, which may only read
-- (grants in grafana-grants.sql, step 2, after `costwatch migrate`).
\set ON_ERROR_STOP on

CREATE ROLE :"owner" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE :"grafana" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'grafana_password';
-- Grafana's long-range panels sum many roll-up rows; JIT compilation costs more than it saves.
ALTER ROLE :"grafana" SET jit = off;
-- On RDS and Cloud SQL the admin is no superuser and must be a member of a role to give it a
-- database; harmless elsewhere.
GRANT :"owner" TO CURRENT_USER;
CREATE DATABASE :"db" OWNER :"owner";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"grafana";

\connect :"db"
-- PostgreSQL 14 and older let every role create tables in `public`; 15 and newer do not.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO :"owner";
