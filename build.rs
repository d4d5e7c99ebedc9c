//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a fresh
//! machine builds without a hand-installed protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Buffers sized for KMS messages instead of tonic's 8 KiB per call (see the codec).
        .codec_path("crate::proto::codec::KmsCodec")
        // Requests and responses that carry plaintext get no derived `Debug`:
        // a stray `{:?}` must never print a DEK seed. They get a redacting one in `proto.rs`.
        .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
        .compile_with_config(
            config,
            &["proto/kms_v2.proto", "proto/admin.proto"],
            &["proto"],
        )?;
    Ok(())
}
