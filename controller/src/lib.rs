//! `sparegrid-controller` as a library. Built so far (issue 3 is in
//! progress):
//!
//! - [`job`]: the work request a researcher submits, its validation, and the
//!   subtasks, jobs and attempts the controller tracks;
//! - [`registry`]: agents' registrations and heartbeats, and the two-set
//!   rule that decides which hosts may hold work (pure, no I/O);
//! - [`split`]: cutting a request into subtasks (`range`, `items`, `lines`);
//! - [`store`]: where jobs, subtasks, attempts and hosts live (SQLite behind
//!   a trait);
//! - [`config`]: the controller's TOML config;
//! - [`api`]: the HTTP/JSON job API, `/metrics` and `/openapi.json`;
//! - [`agents`]: the agent plane (register, heartbeat, completions over
//!   MessagePack), `GET /v1/hosts`, and the push dispatcher;
//! - [`overlay`]: the grid overlay's address pool, peer list and tunnel
//!   status (issue 7);
//! - [`data`]: job data over the transfer protocol (`/v1/data`): uploads
//!   `lines` jobs reference, outputs kept as files (issue 6).

pub mod agents;
pub mod api;
pub mod cli;
pub mod config;
pub mod data;
pub mod job;
pub mod overlay;
pub mod registry;
pub mod split;
pub mod store;
