//! The API contract, generated from the code.
//!
//! Every route is registered through `utoipa_axum`'s `OpenApiRouter` together with its
//! `#[utoipa::path]` description, so a route cannot exist without being documented; the body
//! types below derive their schemas from the same structs the handlers serialize.

use utoipa::OpenApi;

use crate::api::{ColumnDoc, DatasetDoc, DatasetList, Health, JsonResult, QueryBody, Ready};
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
        Ready
    ))
)]
pub struct ApiDoc;
