//! The API contract, generated from the code.
//!
//! Every route is registered through `utoipa_axum`'s `OpenApiRouter` together with its
//! `#[utoipa::path]` description, so a route cannot exist without being documented; the body
//! types below derive their schemas from the same structs the handlers serialize. Each worker
//! adds its pool's security when it builds its router (`login::describe`): a bearer credential
//! required in production, optional in development, and the answers of the check that enforces
//! it. `tests/e2e/contract.rs` fuzzes the result with schemathesis.

use utoipa::OpenApi;

use crate::api::{
    Binary, ColumnDoc, DatasetDoc, DatasetList, Health, JsonResult, QueryBody, Ready,
};
use crate::problem::Problem;

/// The OpenAPI document's fixed parts; paths are added by the router.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "ferrocorn",
        description = "Read-only SQL over the Parquet data directory, served by a pre-fork pool of DuckDB workers. \
                       Errors are application/problem+json with a stable `code`."
    ),
    components(schemas(
        Problem,
        QueryBody,
        JsonResult,
        ColumnDoc,
        DatasetDoc,
        DatasetList,
        Health,
        Ready,
        // Named by the binary formats' responses, whose derive does not collect it.
        Binary
    ))
)]
pub struct ApiDoc;
