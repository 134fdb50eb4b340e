//! Building the gRPC statuses callers see for bad input.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Collects what is wrong with a request, field by field, and turns it into
/// one INVALID_ARGUMENT whose message names every field and whose details
/// carry a `google.rpc.BadRequest` with the same field violations.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<(String, String)>,
}

impl FieldViolations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `grpc_services[2]`) is wrong.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push((field.into(), description.into()));
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok` when nothing was recorded, else the INVALID_ARGUMENT status.
    pub fn check(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let message = self
            .violations
            .iter()
            .map(|(field, description)| format!("{field}: {description}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

/// An INVALID_ARGUMENT naming one field.
pub fn invalid_field(field: &str, description: &str) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations.check().expect_err("one violation was recorded")
}
