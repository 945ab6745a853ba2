-- A rep's mail to two leads (To and Cc) is one Gmail message in both leads' histories (the
-- Gmail poller records it for each): a channel's message id is unique per lead. Per tenant,
-- the second lead's copy was dropped as a conflict. Inbound duplicates are still absorbed: a
-- channel message's lead comes from its sender, so a retried one names the same lead.
ALTER TABLE messages
    DROP CONSTRAINT messages_tenant_id_channel_direction_channel_message_id_key,
    ADD CONSTRAINT messages_channel_message_per_lead
        UNIQUE (tenant_id, channel, direction, channel_message_id, lead_id);
