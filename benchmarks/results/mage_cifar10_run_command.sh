maskgen train mage --config mage-cifar10 --run-dir runs/mage-cifar10 \
  data.tokenizer=runs/tok-cifar10-s1500 data.token_cache=runs/cifar10-tokens-s1500.safetensors \
  model.embed_dim=192 model.num_heads=3 model.decoder_embed_dim=192 model.decoder_num_heads=3 model.decoder_depth=2 \
  model.dropout=0.0 train.batch_size=128 optim.lr=0.0015 schedule.warmup_epochs=0.25 schedule.min_lr=0.00001 \
  train.epochs=2 train.save_every=250 log.every=20 log.sample_every=400 loss.sample_images=32 log.tensorboard=false
