//! ImageService: pulls, lists, status and removal of images.

use super::convert::*;
use super::Cri;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use std::collections::HashMap;
use tonic::{Request, Response, Status};

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let images = match filter {
            Some(f) => self
                .images
                .find(&f)
                .into_iter()
                .map(|r| to_cri_image(&r))
                .collect(),
            None => self.images.list().iter().map(to_cri_image).collect(),
        };
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = image_name(req.image, "ImageStatus")?;
        // An absent image is not an error: the answer carries no image.
        let found = self.images.find(&name);
        let mut info = HashMap::new();
        if let (true, Some(r)) = (req.verbose, &found) {
            info.insert(
                "info".to_string(),
                serde_json::json!({ "chain": r.chain, "user": r.user }).to_string(),
            );
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: found.as_ref().map(to_cri_image),
            info,
        }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = image_name(req.image, "PullImage")?;
        let creds = credentials(req.auth)?;
        let id = self.images.pull(&name, creds).await?;
        Ok(Response::new(cri::PullImageResponse { image_ref: id }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = image_name(req.into_inner().image, "RemoveImage")?;
        self.containers.remove_image(&name).await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let (bytes, inodes, root) = self.images.usage();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: crate::id::now_ns(),
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: root.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}
