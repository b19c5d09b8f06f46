"""The server denoiser: the serving role (:func:`.app.create_server_app`, batched hand-offs)
and the training role (:func:`.trainer.create_trainer_app`)."""
