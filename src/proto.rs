//! Code generated from `proto/` by `build.rs`.

use std::fmt;

/// The KMS v2 API exactly as kube-apiserver speaks it (`package v2`).
#[allow(missing_docs)] // generated; the .proto file documents it
pub mod v2 {
    tonic::include_proto!("v2");
}

/// The operator API served beside it (`kms-plugin status`, `kms-plugin rotate`).
#[allow(missing_docs)] // generated; the .proto file documents it
pub mod admin {
    tonic::include_proto!("kmsplugin.admin.v1");
}

// Messages that carry plaintext print only its length.
impl fmt::Debug for v2::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("plaintext_len", &self.plaintext.len())
            .field("uid", &self.uid)
            .finish()
    }
}

impl fmt::Debug for v2::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

/// The codec of the generated services (`build.rs` sets it as `codec_path`): prost encoding
/// with buffers sized for KMS messages. tonic's default allocates an 8 KiB encode buffer per
/// response and an 8 KiB decode buffer per request; the zeroizing allocator clears every freed
/// byte, so those two buffers alone were ~17k instructions of the plugin's ~110k per call.
/// KMS messages are a few hundred bytes: the buffers start small, a message is encoded into
/// a buffer reserved to its exact length and decoded into one reserved to the length its
/// frame header announces, so a large message costs one growth, not many.
pub mod codec {
    use std::marker::PhantomData;

    use prost::Message;
    use tonic::Status;
    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
    use tonic_prost::{ProstCodec, ProstDecoder};

    /// Initial encode buffer: the encoder then reserves the message's exact length.
    pub const BUFFER_SIZE: usize = 512;
    /// Initial decode buffer. tonic reserves a message's announced length again once the
    /// whole message is already in the buffer, so a message of L bytes needs about 2L: with
    /// 512 bytes a Decrypt request of a file root (about 280 bytes) grew to 1 KiB on every
    /// call (one more allocation, copy and wipe). 1 KiB holds a Decrypt of one root of any
    /// kind, and two RSA-3072 or AWS KMS copies grow once.
    pub const DECODE_BUFFER_SIZE: usize = 1024;
    /// tonic's default: how many bytes a streaming encoder gathers before yielding.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn settings(buffer_size: usize) -> BufferSettings {
        BufferSettings::new(buffer_size, YIELD_THRESHOLD)
    }

    /// See the [module](self) documentation.
    #[derive(Debug, Clone, Copy)]
    pub struct KmsCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for KmsCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for KmsCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = SizedEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            SizedEncoder(PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings(DECODE_BUFFER_SIZE))
        }
    }

    /// Encodes a prost message into a buffer first grown to the message's exact length.
    #[derive(Debug, Clone, Copy)]
    pub struct SizedEncoder<T>(PhantomData<T>);

    impl<T: Message> Encoder for SizedEncoder<T> {
        type Item = T;
        type Error = Status;

        fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| Status::internal(format!("cannot encode the message: {e}")))
        }

        fn buffer_settings(&self) -> BufferSettings {
            settings(BUFFER_SIZE)
        }
    }
}
