//! Faultline's wire protocol (`faultline.v1`): message and service types generated from
//! `proto/faultline/v1/faultline.proto`. Wire types only; conversion into domain types
//! happens at each service's edge.

#![allow(missing_debug_implementations)] // generated gRPC service wrappers carry no Debug impl

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, clippy::unwrap_used)] // generated code
    tonic::include_proto!("faultline.v1");
}
