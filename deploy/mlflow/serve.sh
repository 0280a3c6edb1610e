#!/usr/bin/env bash
# The team's MLflow tracking server: runs, params and metrics in PostgreSQL, artifacts (predictions, reports,
# models) in an artifact store the server proxies, so drivers need a route to the server only.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://team-bucket/mlflow \
#   bash deploy/mlflow/serve.sh
#
# Optional: MLFLOW_HOST (default 0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (4), MLFLOW_ALLOWED_HOSTS (host names
# clients use to reach it, comma-separated; MLflow refuses other Host headers), MLFLOW (the mlflow executable),
# MLFLOW_AUTH_CONFIG_PATH (basic authentication, below).
# The PostgreSQL driver is psycopg 3 (a dependency of this project); s3:// needs boto3. Secrets come from the
# environment, never from this repository.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set it to postgresql://USER:PASSWORD@HOST:PORT/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it to the artifact store, e.g. s3://bucket/prefix or a shared folder}"
args=(server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --serve-artifacts
      --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
      --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
# Users and passwords: MLFLOW_AUTH_CONFIG_PATH names MLflow's basic-auth .ini (admin user, default permission,
# its user database); MLflow reads it, MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY itself.
# Clients then log with --mlflow-uri http://USER:PASSWORD@HOST:PORT (or MLFLOW_TRACKING_USERNAME/PASSWORD).
if [[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
  args+=(--app-name basic-auth)
fi
# mlflow's command line holds the URI, which `ps` shows to root and this user: where that matters, keep the
# password in ~/.pgpass (PostgreSQL's password file) and leave it out of the URI.
exec "${MLFLOW:-mlflow}" "${args[@]}"
